//! Password mode of the mesh TCP connection: the per-connection key pair, the session
//! key (NaCl `crypto_box_beforenm`, then SHA-256 with the password) and the secretbox
//! framing with Weave's TCP nonces.

use salsa20::cipher::consts::U10;
use sha2::{Digest, Sha256};
use thiserror::Error;
use weft_cipher::SecretBox;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::SessionKey;

/// Poly1305 tag length: a sealed message is this much longer than its plaintext.
pub const TAG_LEN: usize = weft_cipher::TAG_LEN;

/// The mesh password. Its bytes are wiped on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    /// A password from its bytes, used exactly as given (no terminator, no trimming).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Password(Zeroizing::new(bytes.into()))
    }

    /// The password's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(..)")
    }
}

/// A connection's ephemeral Curve25519 key pair (NaCl box keys), made fresh for each
/// connection. The secret half is never printed.
pub struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// The key pair whose secret key is `random` (32 bytes from a CSPRNG; clamped as
    /// X25519 does).
    pub fn from_random(random: [u8; 32]) -> Self {
        let secret = StaticSecret::from(random);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }

    /// The public key sent after the encryption byte.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// NaCl `crypto_box_beforenm`: X25519 with the remote public key, then HSalsa20 of
    /// the result with a zero nonce.
    pub fn box_shared_key(&self, remote_public: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let dh = Zeroizing::new(
            self.secret
                .diffie_hellman(&PublicKey::from(*remote_public))
                .to_bytes(),
        );
        let out = salsa20::hsalsa::<U10>((&*dh).into(), &Default::default());
        Zeroizing::new(out.into())
    }

    /// The session key both ends derive: SHA-256(box shared key ‖ password).
    pub fn session_key(&self, remote_public: &[u8; 32], password: &Password) -> SessionKey {
        let shared = self.box_shared_key(remote_public);
        session_key_from_shared(&shared, password)
    }
}

/// SHA-256(shared ‖ password), the session key of a connection.
pub fn session_key_from_shared(shared: &[u8; 32], password: &Password) -> SessionKey {
    let mut h = Sha256::new();
    h.update(shared);
    h.update(password.as_bytes());
    SessionKey(h.finalize().into())
}

/// The nonce of TCP message number `seq` sent by the dialling side (`sender_outbound`)
/// or by the accepting side: byte 0 = 0x80 for the dialler | 0x40 (TCP), bytes 16..24 =
/// `seq` big-endian.
pub fn tcp_nonce(sender_outbound: bool, seq: u64) -> [u8; 24] {
    let mut n = [0u8; 24];
    n[0] = 0x40 | if sender_outbound { 0x80 } else { 0 };
    n[16..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// A TCP message that did not authenticate (wrong password, corruption, or a message
/// out of sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("Unable to decrypt TCP msg")]
pub struct DecryptError;

/// Seals the messages one side sends, numbering them from 0.
pub struct TcpSealer {
    cipher: SecretBox,
    outbound: bool,
    seq: u64,
}

impl std::fmt::Debug for TcpSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSealer")
            .field("outbound", &self.outbound)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl TcpSealer {
    /// The sealer of the side that dialled (`outbound`) or accepted.
    pub fn new(key: &SessionKey, outbound: bool) -> Self {
        TcpSealer {
            cipher: SecretBox::new(&key.0),
            outbound,
            seq: 0,
        }
    }

    /// `secretbox(plaintext)` (tag, then ciphertext) under the next nonce.
    pub fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let nonce = tcp_nonce(self.outbound, self.seq);
        self.seq += 1;
        let mut sealed = vec![0; TAG_LEN + plaintext.len()];
        let (tag, body) = sealed.split_at_mut(TAG_LEN);
        body.copy_from_slice(plaintext);
        tag.copy_from_slice(&self.cipher.seal_in_place(&nonce, body));
        sealed
    }
}

/// Opens the messages the other side sends, expecting its counter exactly.
pub struct TcpOpener {
    cipher: SecretBox,
    sender_outbound: bool,
    seq: u64,
}

impl std::fmt::Debug for TcpOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpOpener")
            .field("sender_outbound", &self.sender_outbound)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl TcpOpener {
    /// The opener for messages from a sender that dialled (`sender_outbound`) or
    /// accepted; the receiver's own direction is the opposite.
    pub fn new(key: &SessionKey, sender_outbound: bool) -> Self {
        TcpOpener {
            cipher: SecretBox::new(&key.0),
            sender_outbound,
            seq: 0,
        }
    }

    /// The plaintext of the next message. The counter moves on only when it opens.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, DecryptError> {
        let (tag, body) = sealed.split_first_chunk::<TAG_LEN>().ok_or(DecryptError)?;
        let nonce = tcp_nonce(self.sender_outbound, self.seq);
        let mut plain = body.to_vec();
        self.cipher
            .open_in_place(&nonce, &mut plain, tag)
            .map_err(|_| DecryptError)?;
        self.seq += 1;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn box_beforenm_matches_nacl() {
        // The test vector of NaCl's tests/box.c and box2.c (alice's secret key, bob's
        // public key); crypto_box_beforenm gives the key k below (tests/box7/box8 and
        // libsodium's test/default/box2.exp use the same pair).
        let alice_sk = hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob_sk = hex32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        let alice = KeyPair::from_random(alice_sk);
        let bob = KeyPair::from_random(bob_sk);
        assert_eq!(
            alice.public_key(),
            hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        assert_eq!(
            bob.public_key(),
            hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        );
        let k = alice.box_shared_key(&bob.public_key());
        assert_eq!(
            *k,
            hex32("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
        );
        assert_eq!(*bob.box_shared_key(&alice.public_key()), *k);
        let pw = Password::new("secret");
        assert_eq!(
            alice.session_key(&bob.public_key(), &pw),
            bob.session_key(&alice.public_key(), &pw)
        );
        assert_ne!(
            alice.session_key(&bob.public_key(), &pw),
            alice.session_key(&bob.public_key(), &Password::new("secreT"))
        );
    }

    #[test]
    fn nonces_are_weaves() {
        let n = tcp_nonce(true, 0);
        assert_eq!(n[0], 0xc0);
        assert!(n[1..].iter().all(|&b| b == 0));
        let n = tcp_nonce(false, 0x0102);
        assert_eq!(n[0], 0x40);
        assert_eq!(n[16..], [0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn seal_open_in_sequence_only() {
        let key = SessionKey([9; 32]);
        let mut s = TcpSealer::new(&key, true);
        let mut o = TcpOpener::new(&key, true);
        let a = s.seal(b"first");
        assert_eq!(a.len(), 5 + TAG_LEN);
        let b = s.seal(b"second");
        // Out of order: the counter expects 0.
        assert_eq!(o.open(&b), Err(DecryptError));
        assert_eq!(o.open(&a).unwrap(), b"first");
        assert_eq!(o.open(&b).unwrap(), b"second");
        // Wrong direction bit.
        let mut wrong = TcpOpener::new(&key, false);
        assert_eq!(wrong.open(&a), Err(DecryptError));
        // Wrong key, short input.
        assert_eq!(
            TcpOpener::new(&SessionKey([8; 32]), true).open(&a),
            Err(DecryptError)
        );
        assert_eq!(TcpOpener::new(&key, true).open(&a[..10]), Err(DecryptError));
        assert_eq!(DecryptError.to_string(), "Unable to decrypt TCP msg");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let pw = Password::new("secret");
        assert_eq!(format!("{pw:?}"), "Password(..)");
        let kp = KeyPair::from_random([7; 32]);
        assert!(!format!("{kp:?}").contains("secret:"));
        let key = SessionKey([0x42; 32]);
        let s = format!(
            "{:?}{:?}",
            TcpSealer::new(&key, true),
            TcpOpener::new(&key, false)
        );
        assert!(!s.contains("66"), "{s}");
    }
}
