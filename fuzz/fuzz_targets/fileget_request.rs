//! file-get on arbitrary client bytes: the command framer, the request parser (`get <path>
//! [<offset>]`, `list [<dir>]`) and the path resolver (openat2 RESOLVE_BENEATH) against a real
//! directory tree. Next to the served root lies a secret file, and inside the root a symlink
//! points at it: no input may ever make a byte of the secret come out.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wharf_core::testing;
use wharf_plugin_file_get::FileGet;

const SECRET: &[u8] = b"SECRET-4f1d2c9a-never-served";

/// `<tmp>/root` (served: files, a subdirectory, an escaping symlink) and `<tmp>/secret.txt`.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("wharf-fuzz-fileget-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(base.join("secret.txt"), SECRET).unwrap();
        std::fs::write(root.join("a.txt"), b"hello\n").unwrap();
        std::fs::write(root.join("sub/b.bin"), vec![7u8; 3000]).unwrap();
        let _ = std::os::unix::fs::symlink("../secret.txt", root.join("escape"));
        let _ = std::os::unix::fs::symlink(base.join("secret.txt"), root.join("absolute"));
        let _ = std::os::unix::fs::symlink("sub", root.join("inside"));
        root
    })
}

fuzz_target!(|data: &[u8]| {
    let service = FileGet::new(root(), 64).expect("the fuzz root exists");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let output = tokio::task::LocalSet::new().block_on(&rt, async {
        let (conn, client) = testing::pipe_with_capacity(64 * 1024);
        let server = testing::spawn(service, conn);
        let reader = client.read_to_end();
        let writer = async {
            // Whole input at once, then close: acks, sizes and commands all come from it.
            let _ = client.write_all(data).await;
            client.close_write();
        };
        let (out, ()) = tokio::join!(reader, writer);
        let _ = server.await.expect("the service task panicked");
        out
    });
    assert!(
        !output.windows(SECRET.len()).any(|w| w == SECRET),
        "the secret outside the root was served for {:?}",
        String::from_utf8_lossy(data)
    );
});
