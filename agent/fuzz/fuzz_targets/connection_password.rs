//! A password-mode connection. The input plays the remote: either raw bytes (first
//! byte even), or (odd) a well-behaved header and public key followed by records
//! `[u16 BE length][plaintext]`, each sealed with the real session key and framed, so
//! the fuzzer reaches the features and messages behind the encryption. Records whose
//! length has the top bit set are sent unsealed (as garbage the opener must reject).
//! No panics; the outcome does not depend on chunking; a failed connection yields
//! nothing more; a well-behaved remote agrees with us on the session key.
#![no_main]

mod common;

use std::{sync::OnceLock, time::Instant};

use libfuzzer_sys::fuzz_target;
use weft::mesh::{
    SessionKey,
    connection::{Connection, Event},
    crypto::{KeyPair, Password, TcpSealer},
    wire::{self, HEADER_LEN, PUBLIC_KEY_LEN},
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let outbound = flags & 2 != 0;
    if flags & 1 == 0 {
        common::check_chunking(true, outbound, rest);
        return;
    }
    // The remote's key pair and the session key, computed once (key agreement is slow).
    static KEYS: OnceLock<([u8; PUBLIC_KEY_LEN], SessionKey)> = OnceLock::new();
    let (remote_public, key) = KEYS.get_or_init(|| {
        // Our public key, from what we send first (the same in both polarities).
        let ours = Connection::new(common::config(true, false), Instant::now()).take_output();
        let our_public: [u8; PUBLIC_KEY_LEN] = ours
            [HEADER_LEN + 1..HEADER_LEN + 1 + PUBLIC_KEY_LEN]
            .try_into()
            .expect("header, flag and key come first");
        let remote = KeyPair::from_random([0x17; 32]);
        let key = remote.session_key(&our_public, &Password::new(common::PASSWORD));
        (remote.public_key(), key)
    });
    // The remote seals with its own polarity: it dialled if we did not.
    let mut sealer = TcpSealer::new(key, !outbound);

    let mut stream = wire::protocol_header().to_vec();
    stream.extend(wire::encryption_announcement(Some(remote_public)));
    let mut r = rest;
    while let Some((len, tail)) = r.split_first_chunk::<2>() {
        let len = u16::from_be_bytes(*len);
        let raw = len & 0x8000 != 0;
        let n = usize::from(len & 0x7fff).min(tail.len());
        let (plain, tail) = tail.split_at(n);
        let body = if raw {
            plain.to_vec()
        } else {
            sealer.seal(plain)
        };
        stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
        stream.extend_from_slice(&body);
        r = tail;
    }
    let outcome = common::check_chunking(true, outbound, &stream);
    if let Some(Event::Ready(intro)) = outcome.events.first() {
        assert_eq!(
            intro.session_key.as_ref(),
            Some(key),
            "both ends derive one key"
        );
        assert_eq!(intro.protocol_version, 2);
    }
});
