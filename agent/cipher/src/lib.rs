//! The encrypted sleeve's cipher: NaCl secretbox (XSalsa20-Poly1305), sealing and
//! opening in place with a detached tag.
//!
//! Why a crate of its own: the agent is built for size (opt-level "s"), and the
//! RustCrypto ciphers are generic, so their code is compiled in the crate that
//! instantiates them. Instantiated here, behind these non-generic functions, they are
//! compiled at this crate's opt-level (3, set in the workspace's release profile),
//! which is what bounds the encrypted sleeve's throughput; the rest of the agent stays
//! small.
#![no_std]
#![forbid(unsafe_code)]

use crypto_secretbox::{AeadInPlace, KeyInit, Nonce, Tag, XSalsa20Poly1305};

/// Key length, bytes.
pub const KEY_LEN: usize = 32;
/// Nonce length, bytes.
pub const NONCE_LEN: usize = 24;
/// Authenticator (Poly1305 tag) length, bytes.
pub const TAG_LEN: usize = 16;

/// A secretbox keyed once, used for many messages.
pub struct SecretBox {
    cipher: XSalsa20Poly1305,
}

impl core::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never the key.
        f.debug_struct("SecretBox").finish_non_exhaustive()
    }
}

/// The tag did not authenticate the message (wrong key or nonce, or tampering). The
/// buffer is left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthenticationFailed;

impl core::fmt::Display for AuthenticationFailed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("secretbox authentication failed")
    }
}

impl core::error::Error for AuthenticationFailed {}

impl SecretBox {
    /// A secretbox with this key.
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        SecretBox {
            cipher: XSalsa20Poly1305::new(key.into()),
        }
    }

    /// Encrypts `buf` in place under `nonce`; returns the tag authenticating it.
    ///
    /// Not inlined: its body stays as this crate compiled it, even under the agent's
    /// fat LTO at opt-level "s".
    #[inline(never)]
    pub fn seal_in_place(&self, nonce: &[u8; NONCE_LEN], buf: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .cipher
            .encrypt_in_place_detached(&Nonce::from(*nonce), &[], buf)
            // It errs only when given associated data, which secretbox has none of.
            .expect("secretbox sealing without associated data");
        tag.into()
    }

    /// Checks `tag` and decrypts `buf` in place under `nonce`; on failure `buf` is
    /// unchanged (the tag is checked before any byte is decrypted).
    ///
    /// Not inlined, as [`SecretBox::seal_in_place`].
    #[inline(never)]
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AuthenticationFailed> {
        self.cipher
            .decrypt_in_place_detached(&Nonce::from(*nonce), &[], buf, &Tag::from(*tag))
            .map_err(|_| AuthenticationFailed)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    const KEY: [u8; KEY_LEN] = [7; KEY_LEN];
    const NONCE: [u8; NONCE_LEN] = [9; NONCE_LEN];

    /// NaCl's secretbox test vector (`tests/secretbox.c` and `secretbox.out` of the
    /// NaCl distribution, as RustCrypto's `crypto_secretbox` tests carry it).
    const NACL_KEY: &str = "1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389";
    const NACL_NONCE: &str = "69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37";
    const NACL_PLAINTEXT: &str = concat!(
        "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffce5ecbaaf33bd751a",
        "1ac728d45e6c61296cdc3c01233561f41db66cce314adb310e3be8250c46f06dceea3a7fa1348057",
        "e2f6556ad6b1318a024a838f21af1fde048977eb48f59ffd4924ca1c60902e52f0a089bc76897040",
        "e082f937763848645e0705"
    );
    /// The tag, then the ciphertext.
    const NACL_SEALED: &str = concat!(
        "f3ffc7703f9400e52a7dfb4b3d3305d98e993b9f48681273c29650ba32fc76ce48332ea7164d96a4",
        "476fb8c531a1186ac0dfc17c98dce87b4da7f011ec48c97271d2c20f9b928fe2270d6fb863d51738",
        "b48eeee314a7cc8ab932164548e526ae90224368517acfeabd6bb3732bc0e9da99832b61ca01b6de",
        "56244a9e88d5f9b37973f622a43d14a6599b1f654cb45a74e355a5"
    );

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn nacl_vector() {
        let b = SecretBox::new(&hex(NACL_KEY).try_into().unwrap());
        let nonce: [u8; NONCE_LEN] = hex(NACL_NONCE).try_into().unwrap();
        let mut buf = hex(NACL_PLAINTEXT);
        let tag = b.seal_in_place(&nonce, &mut buf);
        let sealed = hex(NACL_SEALED);
        assert_eq!(tag[..], sealed[..TAG_LEN]);
        assert_eq!(buf, sealed[TAG_LEN..]);
        b.open_in_place(&nonce, &mut buf, &tag).unwrap();
        assert_eq!(buf, hex(NACL_PLAINTEXT));
    }

    #[test]
    fn tampering_fails_and_leaves_the_buffer() {
        let b = SecretBox::new(&KEY);
        let mut buf = *b"sleeve datagram frames";
        let tag = b.seal_in_place(&NONCE, &mut buf);
        let sealed = buf;
        let mut flipped = buf;
        flipped[3] ^= 1;
        let tampered = flipped;
        assert_eq!(
            b.open_in_place(&NONCE, &mut flipped, &tag),
            Err(AuthenticationFailed)
        );
        assert_eq!(flipped, tampered, "a failed open changed the buffer");
        let mut bad_tag = tag;
        bad_tag[15] ^= 0x80;
        assert_eq!(
            b.open_in_place(&NONCE, &mut buf, &bad_tag),
            Err(AuthenticationFailed)
        );
        let mut other_nonce = NONCE;
        other_nonce[23] ^= 1;
        assert_eq!(
            b.open_in_place(&other_nonce, &mut buf, &tag),
            Err(AuthenticationFailed)
        );
        assert_eq!(buf, sealed, "a failed open changed the buffer");
        assert_eq!(
            SecretBox::new(&[8; KEY_LEN]).open_in_place(&NONCE, &mut buf, &tag),
            Err(AuthenticationFailed)
        );
        b.open_in_place(&NONCE, &mut buf, &tag).unwrap();
        assert_eq!(&buf, b"sleeve datagram frames");
    }
}
