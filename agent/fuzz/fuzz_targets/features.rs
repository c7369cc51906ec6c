//! The features map (the first message of a connection) and the protocol header:
//! decoding arbitrary bytes never panics, and what decodes re-encodes to bytes that
//! decode to the same features.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::mesh::wire::{Features, HEADER_LEN, negotiate_version};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<HEADER_LEN>()
        && let Ok(v) = negotiate_version(header)
    {
        assert_eq!(v, 2);
    }
    let pairs = Features::decode_map(data);
    let decoded = Features::decode(data);
    match (&pairs, &decoded) {
        (Err(_), Ok(_)) => panic!("features decoded from a body whose map did not"),
        (Ok(pairs), Ok(f)) => {
            assert_eq!(Features::from_pairs(pairs).as_ref(), Ok(f));
            let again = Features::decode(&f.encode()).expect("re-encoded features decode");
            assert_eq!(&again, f);
        }
        _ => {}
    }
});
