//! Peer identity: the 48-bit [`PeerName`] (written like a MAC address).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A 48-bit Weave peer name, written like a MAC address (`aa:00:00:00:00:01`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerName(pub [u8; 6]);

/// A string that is not a peer name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{value:?} is not a peer name (expected six hex octets separated by ':', like aa:00:00:00:00:01)"
)]
pub struct PeerNameError {
    /// The rejected text.
    pub value: String,
}

impl FromStr for PeerName {
    type Err = PeerNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PeerNameError {
            value: s.to_owned(),
        };
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(PeerName(octets))
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerName({self})")
    }
}

impl Serialize for PeerName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PeerName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl PeerName {
    /// The name as the 48-bit number Weave orders names by (the lower name wins a
    /// ShortID clash) and sends in gossip.
    pub fn to_u64(self) -> u64 {
        self.0.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }

    /// Weave's name for a machine: the first six bytes of SHA-256 over a fixed salt
    /// and the machine's IDs (`/etc/machine-id` then the DMI or hypervisor UUID), as
    /// a locally administered unicast MAC. The same machine always gets the same name.
    pub fn from_system_id(system_id: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"9oBJ0Jmip-");
        hash.update(system_id);
        let sum = hash.finalize();
        let mut name = [0u8; 6];
        name.copy_from_slice(&sum[..6]);
        name[0] = (name[0] & 0xfe) | 0x02;
        PeerName(name)
    }

    /// The name of a 48-bit number; the upper 16 bits of `value` are ignored.
    pub fn from_u64(value: u64) -> Self {
        let b = value.to_be_bytes();
        PeerName([b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_name_parses_and_prints_lowercase() {
        let name: PeerName = "7E:21:4a:70:2F:45".parse().unwrap();
        assert_eq!(name.0, [0x7e, 0x21, 0x4a, 0x70, 0x2f, 0x45]);
        assert_eq!(name.to_string(), "7e:21:4a:70:2f:45");
        assert_eq!(format!("{name:?}"), "PeerName(7e:21:4a:70:2f:45)");
    }

    #[test]
    fn peer_name_rejects_bad_syntax() {
        for bad in [
            "",
            "aa:00:00:00:00",
            "aa:00:00:00:00:01:02",
            "aa:00:00:00:00:1",
            "aa:00:00:00:00:001",
            "aa-00-00-00-00-01",
            "aa:00:00:00:00:0g",
            "aa:00:00:00:00:01:",
            "+a:00:00:00:00:01",
            "aa:00:00:00:00: 1",
        ] {
            let e = bad.parse::<PeerName>().unwrap_err();
            assert_eq!(e.value, bad);
            assert!(e.to_string().contains("is not a peer name"), "{e}");
        }
    }

    #[test]
    fn peer_name_serde_is_a_string() {
        let name = PeerName([0xaa, 0, 0, 0, 0, 1]);
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"aa:00:00:00:00:01\"");
        assert_eq!(serde_json::from_str::<PeerName>(&json).unwrap(), name);
        let e = serde_json::from_str::<PeerName>("\"nope\"").unwrap_err();
        assert!(e.to_string().contains("is not a peer name"), "{e}");
    }

    #[test]
    fn system_names_are_stable_local_unicast_macs() {
        let a = PeerName::from_system_id(b"0123456789abcdef0123456789abcdef\n");
        assert_eq!(
            a,
            PeerName::from_system_id(b"0123456789abcdef0123456789abcdef\n")
        );
        assert_ne!(a, PeerName::from_system_id(b"another machine\n"));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered, unicast: {a}");
        // SHA-256("9oBJ0Jmip-x") starts with c9 72 fa 2e 99 8a; the low bits of
        // the first byte become 10 (as Weave's MACfromUUID does).
        assert_eq!(
            PeerName::from_system_id(b"x").to_string(),
            "ca:72:fa:2e:99:8a"
        );
    }

    #[test]
    fn peer_name_as_number() {
        let name = PeerName([0xaa, 0, 0, 0, 0, 2]);
        assert_eq!(name.to_u64(), 0xaa00_0000_0002);
        assert_eq!(PeerName::from_u64(0xaa00_0000_0002), name);
    }
}
