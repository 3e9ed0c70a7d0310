//! MD5 at the speed of this machine's assembly: the file-get protocol's whole-file digest is
//! one sequential MD5 per download, computed by the server for a file it has not hashed yet
//! and by every client that verifies what it received, so MD5's speed is the protocol's
//! speed limit.
//!
//! This is the `md-5` crate (a required dependency of the project) with its `asm` feature:
//! on x86 and x86_64 the compression function is md5-asm's assembly, elsewhere the portable
//! Rust. Measured on the project's machine (BENCHMARKS.md, "file-get"): 540-574 MB/s of one
//! core against 399-459 for the portable code, `md5sum` 416-456 and `openssl md5` 429-461;
//! aws-lc's assembly (linked for TLS) reached 602-608, about 1.1x more, which did not justify
//! FFI to a second MD5 when the download target is met with this one. MD5 here detects damaged
//! or changed downloads; it is never used where an attacker's collision would matter.
//!
//! One type for every user (file-get's digests and resumable states, `wharf client get`,
//! `wharf bench get --verify`, TLS certificate fingerprints), so the choice lives here.

use std::fmt;
use std::io;

use ::md5::Digest;

/// An MD5 computation in progress: feed it bytes with [`Md5::update`], read the digest of what
/// it has had so far with [`Md5::digest`] (and go on feeding it, if wanted). Cloning it forks
/// the computation: file-get keeps a stopped download's state to continue it later.
#[derive(Clone, Default)]
pub struct Md5 {
    state: ::md5::Md5,
}

impl Md5 {
    /// The state before any byte.
    pub fn new() -> Self {
        Md5::default()
    }

    /// Hashes `bytes`, the next ones of the message.
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        self.state.update(bytes.as_ref());
    }

    /// The digest of the bytes hashed so far (the state itself is left as it is).
    pub fn digest(&self) -> [u8; 16] {
        self.state.clone().finalize().into()
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> [u8; 16] {
        ::md5::Md5::digest(bytes).into()
    }
}

impl fmt::Debug for Md5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Md5").finish_non_exhaustive()
    }
}

/// Feeds what is written into the hash (for `io::copy` from a file).
impl io::Write for Md5 {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A digest as 32 lowercase hex digits, as the file-get protocol sends it.
pub fn hex(digest: &[u8; 16]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(32);
    for b in digest {
        text.push(DIGITS[usize::from(b >> 4)] as char);
        text.push(DIGITS[usize::from(b & 15)] as char);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(bytes: &[u8]) -> String {
        hex(&Md5::of(bytes))
    }

    #[test]
    fn rfc_1321_test_suite() {
        for (input, digest) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            assert_eq!(hex_of(input.as_bytes()), digest, "{input:?}");
        }
    }

    /// Any split of the input into updates, a digest read midway, and a clone continuing on
    /// its own all agree with the digest of the whole input at once.
    #[test]
    fn splits_midway_digests_and_forks_agree() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..200_003)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let whole = Md5::of(&data);
        for step in [1usize, 3, 63, 64, 65, 1000, 4096, 65_537, 200_003] {
            let mut ours = Md5::new();
            let mut forked = None;
            let mut so_far = 0;
            for (i, piece) in data.chunks(step).enumerate() {
                ours.update(piece);
                so_far += piece.len();
                if i == 1 {
                    assert_eq!(ours.digest(), Md5::of(&data[..so_far]), "step {step}");
                    forked = Some((ours.clone(), so_far));
                }
            }
            assert_eq!(ours.digest(), whole, "step {step}");
            if let Some((mut fork, at)) = forked {
                fork.update(b"a different ending");
                let mut other = data[..at].to_vec();
                other.extend_from_slice(b"a different ending");
                assert_eq!(fork.digest(), Md5::of(&other), "step {step}");
            }
        }
        let mut written = Md5::new();
        io::copy(&mut &data[..], &mut written).unwrap();
        assert_eq!(written.digest(), whole);
    }
}
