//! A gob stream of arbitrary bytes: the decoder never panics, and every type
//! definition it accepted re-encodes to a definition that decodes to the same type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::mesh::gob::{Decoder, Reader};

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new();
    let mut r = Reader::new(data);
    let mut before = r.remaining().len();
    loop {
        match d.next_value(&mut r) {
            Ok(Some(_)) => {
                // Progress: every value consumes input, so the loop ends.
                let now = r.remaining().len();
                assert!(now < before, "a value was decoded without consuming input");
                before = now;
            }
            Ok(None) => {
                assert!(r.is_empty());
                break;
            }
            Err(_) => break,
        }
    }
    for (&id, def) in d.types() {
        let mut out = Vec::new();
        def.put_definition(&mut out, id);
        let mut again = Decoder::new();
        let mut r = Reader::new(&out);
        assert_eq!(
            again.next_value(&mut r),
            Ok(None),
            "a definition holds no value"
        );
        assert_eq!(
            again.types().get(&id),
            Some(def),
            "type {id} did not round-trip"
        );
    }
});
