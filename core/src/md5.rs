//! MD5 at the speed of this machine's assembly: the file-get protocol's whole-file digest is
//! one sequential MD5 per download, computed by the server for a file it has not hashed yet
//! and by every client that verifies what it received, so MD5's speed is the protocol's
//! speed limit.
//!
//! This is aws-lc's MD5 (the x86-64 and ARMv8 assembly it shares with OpenSSL), from the
//! library rustls already links for TLS: no new dependency. On the project's machine it hashes
//! about 1.36x as fast as the pure-Rust `md-5` crate and 1.1x `md-5` with its `asm` backend
//! (BENCHMARKS.md, "file-get"). MD5 here detects damaged or changed downloads; it is never
//! used where an attacker's collision would matter.

use std::fmt;
use std::io;

use aws_lc_sys::{MD5_Final, MD5_Init, MD5_Update, MD5_CTX};

/// An MD5 computation in progress: feed it bytes with [`Md5::update`], read the digest of what
/// it has had so far with [`Md5::digest`] (and go on feeding it, if wanted). Cloning it forks
/// the computation: file-get keeps a stopped download's state to continue it later.
#[derive(Clone)]
pub struct Md5 {
    ctx: MD5_CTX,
}

impl Md5 {
    /// The state before any byte.
    pub fn new() -> Self {
        let mut ctx = MD5_CTX {
            h: [0; 4],
            Nl: 0,
            Nh: 0,
            data: [0; 64],
            num: 0,
        };
        // SAFETY: `ctx` is a valid, exclusively borrowed MD5_CTX; MD5_Init only writes it.
        unsafe { MD5_Init(&mut ctx) };
        Md5 { ctx }
    }

    /// Hashes `bytes`, the next ones of the message.
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = bytes.as_ref();
        // SAFETY: `ctx` is initialized (by `new`) and exclusively borrowed; MD5_Update reads
        // exactly `bytes.len()` bytes from `bytes` (none when it is empty).
        unsafe { MD5_Update(&mut self.ctx, bytes.as_ptr().cast(), bytes.len()) };
    }

    /// The digest of the bytes hashed so far (the state itself is left as it is).
    pub fn digest(&self) -> [u8; 16] {
        let mut ctx = self.ctx;
        let mut out = [0u8; 16];
        // SAFETY: `ctx` is an initialized copy of the state; MD5_Final writes 16 bytes to
        // `out`, which has room for them.
        unsafe { MD5_Final(out.as_mut_ptr(), &mut ctx) };
        out
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> [u8; 16] {
        let mut md5 = Md5::new();
        md5.update(bytes);
        md5.digest()
    }
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
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
    use md5_crate::Digest;

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
    /// its own all agree with the pure-Rust `md-5` crate.
    #[test]
    fn agrees_with_md_5_however_the_bytes_come() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..200_003)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for step in [1usize, 3, 63, 64, 65, 1000, 4096, 65_537, 200_003] {
            let mut ours = Md5::new();
            let mut theirs = md5_crate::Md5::new();
            let mut forked = None;
            for (i, piece) in data.chunks(step).enumerate() {
                ours.update(piece);
                theirs.update(piece);
                if i == 1 {
                    assert_eq!(ours.digest(), <[u8; 16]>::from(theirs.clone().finalize()));
                    forked = Some((ours.clone(), theirs.clone()));
                }
            }
            assert_eq!(
                ours.digest(),
                <[u8; 16]>::from(theirs.finalize()),
                "step {step}"
            );
            if let Some((mut ours, mut theirs)) = forked {
                ours.update(b"a different ending");
                theirs.update(b"a different ending");
                assert_eq!(ours.digest(), <[u8; 16]>::from(theirs.finalize()));
            }
        }
        let mut written = Md5::new();
        io::copy(&mut &data[..], &mut written).unwrap();
        assert_eq!(written.digest(), Md5::of(&data));
    }
}
