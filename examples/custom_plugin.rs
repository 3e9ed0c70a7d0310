//! A third-party plugin, end to end: a line-reversing service, its typed options, a unit test
//! through `wharf_core::testing`, and a binary that serves it next to the built-in plugins.
//!
//! Run it with a config that names the plugin:
//!
//! ```text
//! cargo run --example custom_plugin -- serve --config configs/examples/reverse.toml
//! cargo run --example custom_plugin -- client echo 127.0.0.1:7070 hello wharf   # frahw olleh
//! ```

use std::io;

use serde::{Deserialize, Serialize};
use wharf_core::framing::{FrameTooLong, Lines};
use wharf_core::{Conn, Context, OptionDoc, Plugin, PluginError, Service};

/// Options under `[services.<name>.options]`. `deny_unknown_fields` turns typos into errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReverseOptions {
    /// Longest accepted line, in bytes.
    pub max_line: usize,
}

impl Default for ReverseOptions {
    fn default() -> Self {
        ReverseOptions { max_line: 1024 }
    }
}

/// Answers every `\n`-terminated line with its bytes reversed.
pub struct Reverse {
    max_line: usize,
}

#[wharf_core::async_trait(?Send)]
impl Service for Reverse {
    async fn serve<C: Conn + 'static>(&self, conn: C, cx: &Context) -> io::Result<()> {
        // `Lines` waits for the next line through the context, so a server stop ends an idle
        // connection at once instead of holding the restart for the whole grace period.
        let mut lines = Lines::new(conn, cx).max_len(self.max_line);
        loop {
            let mut line = match lines.next().await {
                Ok(Some(line)) => line,
                Ok(None) => return lines.conn().shutdown().await,
                Err(e) if FrameTooLong::is(&e) => {
                    let (res, _) = lines.conn().write_all(b"line too long\n".to_vec()).await;
                    return res;
                }
                Err(e) => return Err(e),
            };
            line.reverse();
            line.push(b'\n');
            let (res, _) = lines.conn().write_all(line).await;
            res?;
        }
    }
}

impl Plugin for Reverse {
    const NAME: &'static str = "reverse";
    const DESCRIPTION: &'static str = "reverses each line (an example third-party plugin)";
    const OPTIONS: &'static [OptionDoc] = &[OptionDoc {
        name: "max_line",
        kind: "integer (bytes)",
        help: "longest accepted line; longer ones end the connection with an error line",
    }];
    type Options = ReverseOptions;

    fn build(options: ReverseOptions) -> Result<Self, PluginError> {
        if options.max_line == 0 {
            return Err(PluginError::option("max_line", "must be at least 1"));
        }
        Ok(Reverse {
            max_line: options.max_line,
        })
    }
}

/// The binary: built-in plugins plus ours, one line.
fn main() {
    let mut registry = wharf::Registry::with_builtins();
    registry.register::<Reverse>();
    std::process::exit(wharf::cli::main(registry));
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_core::testing;

    #[test]
    fn reverses_lines_split_anywhere() {
        testing::block_on(async {
            let (conn, client) = testing::pipe();
            let server = testing::spawn(Reverse { max_line: 64 }, conn);
            for piece in [&b"hel"[..], b"lo\nwh", b"arf\n"] {
                client.write_all(piece).await.unwrap();
            }
            client.close_write();
            assert_eq!(client.read_to_end().await, b"olleh\nfrahw\n");
            server.await.unwrap().unwrap();
        });
    }
}
