//! The static peers file: one `[[peer]]` entry per host of the mesh, this one included.
//!
//! ```toml
//! [[peer]]
//! name = "aa:00:00:00:00:01"   # 48-bit PeerName, written like a MAC
//! nickname = "host1"
//! short_id = 1                 # 0..=4095, unique in the mesh
//! address = "192.168.48.11"    # underlay IPv4 address
//! ```
//!
//! [`PeersFile::parse`] checks every entry (fields and their types through serde,
//! then syntax, ranges, duplicates) and reports the first problem naming the entry
//! (`peer 2 ("host2")`) and the field.
//! [`PeersFile::split`] then picks out the local entry by its `--name`.

use std::{
    collections::HashMap,
    io::Read,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_path_to_error::Segment;
use thiserror::Error;
use weft_common::wire::{MAX_SHORT_ID, ShortId};

/// Longest accepted nickname, in characters.
pub const MAX_NICKNAME_CHARS: usize = 64;

/// Largest peers file [`PeersFile::load`] reads (it is a few lines per host).
pub const MAX_FILE_BYTES: u64 = 4 << 20;

pub use weft::mesh::PeerName;

/// One host of the mesh, as listed in the peers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Unique 48-bit name.
    pub name: PeerName,
    /// Human-friendly name (usually the hostname), shown as `name(nickname)`.
    pub nickname: String,
    /// 12-bit id carried in the VXLAN VNI, unique in the mesh.
    pub short_id: ShortId,
    /// Underlay IPv4 address: where VXLAN to this peer goes, and the only source
    /// accepted from it.
    pub address: Ipv4Addr,
}

/// A validated peers file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeersFile {
    /// Every entry, in file order.
    pub peers: Vec<Peer>,
    /// Where it was loaded from (`None` when parsed from a string); used in messages.
    pub path: Option<PathBuf>,
}

/// Why a peers file was rejected. Every message is complete on its own (the OS or
/// TOML error is part of it), so print errors with `{}`.
#[derive(Debug, Error)]
pub enum PeersError {
    /// The file could not be opened or read.
    #[error("cannot read peers file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("peers file {} is larger than {} bytes", path.display(), MAX_FILE_BYTES)]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A problem in the contents of a file read by [`PeersFile::load`].
    #[error("peers file {}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// The problem (any variant other than `Read`, `TooLarge` and `InFile`).
        error: Box<PeersError>,
    },
    /// Not valid TOML, or a top-level key other than `peer`.
    #[error("not a valid peers file: {0}")]
    Syntax(String),
    /// No `[[peer]]` entries at all.
    #[error("no [[peer]] entries (list every host of the mesh, this one included)")]
    NoPeers,
    /// An entry lacks a field, has one weft does not know (a typo, most likely), or
    /// has one of the wrong type or syntax (as serde reports it).
    #[error("{entry}: {problem}")]
    Entry {
        /// Which entry, e.g. `peer 2 ("host2")`.
        entry: String,
        /// What is wrong, naming the field.
        problem: String,
    },
    /// `name` is all zeros.
    #[error("{entry}: name 00:00:00:00:00:00 is reserved (it means \"unknown peer\")")]
    ReservedName {
        /// Which entry.
        entry: String,
    },
    /// `nickname` is empty, too long, or holds whitespace or control characters.
    #[error("{entry}: nickname {reason}")]
    BadNickname {
        /// Which entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `short_id` is outside `0..=4095`.
    #[error("{entry}: short_id {value} is out of range 0..={max}", max = MAX_SHORT_ID)]
    ShortIdRange {
        /// Which entry.
        entry: String,
        /// The value found.
        value: i64,
    },
    /// `address` is not a unicast IPv4 address.
    #[error("{entry}: address {value:?} {reason}")]
    BadAddress {
        /// Which entry.
        entry: String,
        /// The value found.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two entries share a name, short_id or address.
    #[error("{first} and {second} have the same {field} {value}")]
    Duplicate {
        /// The earlier entry.
        first: String,
        /// The later entry.
        second: String,
        /// The shared field.
        field: &'static str,
        /// The shared value.
        value: String,
    },
    /// The local peer's `--name` is not in the file.
    #[error("--name {name}: not found in {}", match path {
        Some(p) => format!("peers file {}", p.display()),
        None => "the peers file".to_owned(),
    })]
    NotFound {
        /// The name looked for.
        name: PeerName,
        /// The file, when known.
        path: Option<PathBuf>,
    },
}

/// The top level of the file: only `[[peer]]` entries are allowed. Entries stay
/// tables here, so one that fails to deserialize can still be named by its nickname.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    peer: Vec<toml::Table>,
}

/// One `[[peer]]` entry as written; [`parse_entry`] checks the values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: PeerName,
    nickname: String,
    /// Wider than [`ShortId`] so that an out-of-range value gets its own message.
    short_id: i64,
    /// A string, so that a bad one can be quoted in the message.
    address: String,
}

impl PeersFile {
    /// Parses and validates the text of a peers file.
    pub fn parse(text: &str) -> Result<Self, PeersError> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| PeersError::Syntax(e.to_string().trim().to_owned()))?;
        if raw.peer.is_empty() {
            return Err(PeersError::NoPeers);
        }
        let mut peers = Vec::with_capacity(raw.peer.len());
        for (i, table) in raw.peer.into_iter().enumerate() {
            peers.push(parse_entry(i + 1, table)?);
        }
        check_unique(&peers)?;
        Ok(PeersFile { peers, path: None })
    }

    /// Reads, parses and validates the peers file at `path`.
    pub fn load(path: &Path) -> Result<Self, PeersError> {
        let read_err = |error| PeersError::Read {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(PeersError::TooLarge {
                path: path.to_owned(),
            });
        }
        let mut file = Self::parse(&text).map_err(|error| PeersError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })?;
        file.path = Some(path.to_owned());
        Ok(file)
    }

    /// Returns the entry named `me` (this host) and every other entry, in file order.
    pub fn split(&self, me: &PeerName) -> Result<(Peer, Vec<Peer>), PeersError> {
        let local =
            self.peers
                .iter()
                .find(|p| p.name == *me)
                .ok_or_else(|| PeersError::NotFound {
                    name: *me,
                    path: self.path.clone(),
                })?;
        let remotes = self
            .peers
            .iter()
            .filter(|p| p.name != *me)
            .cloned()
            .collect();
        Ok((local.clone(), remotes))
    }
}

/// How an entry is named in messages: `peer 2 ("host2")`, or `peer 2` when it has no
/// usable nickname.
fn entry_label(index: usize, table: &toml::Table) -> String {
    match table.get("nickname").and_then(toml::Value::as_str) {
        Some(nick) => format!("peer {index} ({nick:?})"),
        None => format!("peer {index}"),
    }
}

fn label_of(index: usize, peer: &Peer) -> String {
    format!("peer {index} ({:?})", peer.nickname)
}

fn parse_entry(index: usize, table: toml::Table) -> Result<Peer, PeersError> {
    let entry = entry_label(index, &table);
    let RawPeer {
        name,
        nickname,
        short_id,
        address,
    } = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        // The path ends in the field whose key or value was the problem; messages
        // about missing and unknown fields name the field themselves.
        let message = e.inner().message();
        let problem = match e.path().iter().next_back() {
            Some(Segment::Map { key }) if !message.contains(&format!("`{key}`")) => {
                format!("{key}: {message}")
            }
            _ => message.to_owned(),
        };
        PeersError::Entry {
            entry: entry.clone(),
            problem,
        }
    })?;
    if name.0 == [0; 6] {
        return Err(PeersError::ReservedName { entry });
    }

    let nick_err = |reason: String| PeersError::BadNickname {
        entry: entry.clone(),
        reason,
    };
    if nickname.is_empty() {
        return Err(nick_err("must not be empty".to_owned()));
    }
    if nickname.chars().count() > MAX_NICKNAME_CHARS {
        return Err(nick_err(format!(
            "is longer than {MAX_NICKNAME_CHARS} characters"
        )));
    }
    if nickname
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(nick_err(format!(
            "{nickname:?} contains whitespace or control characters"
        )));
    }

    let short_id = ShortId::try_from(short_id)
        .ok()
        .filter(|id| *id <= MAX_SHORT_ID)
        .ok_or_else(|| PeersError::ShortIdRange {
            entry: entry.clone(),
            value: short_id,
        })?;

    let bad_address = |reason| PeersError::BadAddress {
        entry: entry.clone(),
        value: address.clone(),
        reason,
    };
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| bad_address("is not an IPv4 address (like 192.168.48.11)"))?;
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return Err(bad_address("is not a unicast address"));
    }

    Ok(Peer {
        name,
        nickname,
        short_id,
        address,
    })
}

/// Fails on the first pair of entries sharing a name, short_id or address.
fn check_unique(peers: &[Peer]) -> Result<(), PeersError> {
    let mut names = HashMap::new();
    let mut ids = HashMap::new();
    let mut addrs = HashMap::new();
    for (i, peer) in peers.iter().enumerate() {
        let seen = [
            ("name", names.insert(peer.name, i), peer.name.to_string()),
            (
                "short_id",
                ids.insert(peer.short_id, i),
                peer.short_id.to_string(),
            ),
            (
                "address",
                addrs.insert(peer.address, i),
                peer.address.to_string(),
            ),
        ];
        for (field, earlier, value) in seen {
            if let Some(j) = earlier {
                return Err(PeersError::Duplicate {
                    first: label_of(j + 1, &peers[j]),
                    second: label_of(i + 1, peer),
                    field,
                    value,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# three hosts
[[peer]]
name = "aa:00:00:00:00:01"
nickname = "host1"
short_id = 1
address = "192.168.48.11"

[[peer]]
name = "AA:00:00:00:00:02"
nickname = "host2"
short_id = 4095
address = "192.168.48.12"

[[peer]]
name = "aa:00:00:00:00:03"
nickname = "host3"
short_id = 0
address = "192.168.48.13"
"#;

    fn entry(name: &str, nick: &str, id: &str, addr: &str) -> String {
        format!(
            "[[peer]]\nname = \"{name}\"\nnickname = \"{nick}\"\nshort_id = {id}\naddress = \"{addr}\"\n"
        )
    }

    fn two_with_second(name: &str, nick: &str, id: &str, addr: &str) -> String {
        entry("aa:00:00:00:00:01", "host1", "1", "10.0.0.1") + &entry(name, nick, id, addr)
    }

    fn err(text: &str) -> String {
        PeersFile::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_file_parses_and_splits() {
        let file = PeersFile::parse(GOOD).unwrap();
        assert_eq!(file.peers.len(), 3);
        assert_eq!(
            file.peers[1],
            Peer {
                name: PeerName([0xaa, 0, 0, 0, 0, 2]),
                nickname: "host2".to_owned(),
                short_id: 4095,
                address: Ipv4Addr::new(192, 168, 48, 12),
            }
        );
        let me: PeerName = "aa:00:00:00:00:02".parse().unwrap();
        let (local, remotes) = file.split(&me).unwrap();
        assert_eq!(local.nickname, "host2");
        let nicks: Vec<_> = remotes.iter().map(|p| p.nickname.as_str()).collect();
        assert_eq!(nicks, ["host1", "host3"]);
    }

    #[test]
    fn single_host_mesh_is_allowed() {
        let file = PeersFile::parse(&entry("aa:00:00:00:00:01", "solo", "7", "10.0.0.1")).unwrap();
        let (local, remotes) = file.split(&file.peers[0].name).unwrap();
        assert_eq!(local.short_id, 7);
        assert!(remotes.is_empty());
    }

    #[test]
    fn own_name_absent() {
        let file = PeersFile::parse(GOOD).unwrap();
        let me: PeerName = "aa:00:00:00:00:09".parse().unwrap();
        assert_eq!(
            file.split(&me).unwrap_err().to_string(),
            "--name aa:00:00:00:00:09: not found in the peers file"
        );
        let file = PeersFile {
            path: Some(PathBuf::from("/etc/weft/peers.toml")),
            ..file
        };
        assert_eq!(
            file.split(&me).unwrap_err().to_string(),
            "--name aa:00:00:00:00:09: not found in peers file /etc/weft/peers.toml"
        );
    }

    #[test]
    fn empty_file_and_no_entries() {
        for text in ["", "\n# nothing here\n", "peer = []"] {
            assert!(matches!(PeersFile::parse(text), Err(PeersError::NoPeers)));
        }
        assert_eq!(
            err(""),
            "no [[peer]] entries (list every host of the mesh, this one included)"
        );
    }

    #[test]
    fn invalid_toml_and_unknown_top_level_key() {
        let e = err("[[peer]\nname = 1");
        assert!(e.starts_with("not a valid peers file: "), "{e}");
        let e = err("[[peers]]\nname = \"aa:00:00:00:00:01\"\n");
        assert!(e.contains("unknown field `peers`"), "{e}");
        let e = err("peer = 3\n");
        assert!(e.starts_with("not a valid peers file: "), "{e}");
    }

    #[test]
    fn short_id_out_of_range() {
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "host2",
                "5000",
                "10.0.0.2"
            )),
            "peer 2 (\"host2\"): short_id 5000 is out of range 0..=4095"
        );
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "host2",
                "-1",
                "10.0.0.2"
            )),
            "peer 2 (\"host2\"): short_id -1 is out of range 0..=4095"
        );
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "host2",
                "99999999999",
                "10.0.0.2"
            )),
            "peer 2 (\"host2\"): short_id 99999999999 is out of range 0..=4095"
        );
    }

    #[test]
    fn missing_fields() {
        for field in ["name", "nickname", "short_id", "address"] {
            let text = entry("aa:00:00:00:00:01", "host1", "1", "10.0.0.1")
                .lines()
                .filter(|l| !l.starts_with(field))
                .collect::<Vec<_>>()
                .join("\n");
            let label = if field == "nickname" {
                "peer 1"
            } else {
                "peer 1 (\"host1\")"
            };
            assert_eq!(err(&text), format!("{label}: missing field `{field}`"));
        }
    }

    #[test]
    fn unknown_field() {
        let text = entry("aa:00:00:00:00:01", "host1", "1", "10.0.0.1") + "adress = \"10.0.0.9\"\n";
        assert_eq!(
            err(&text),
            "peer 1 (\"host1\"): unknown field `adress`, expected one of `name`, `nickname`, \
             `short_id`, `address`"
        );
    }

    #[test]
    fn wrong_types() {
        let text = two_with_second("aa:00:00:00:00:02", "host2", "\"2\"", "10.0.0.2");
        assert_eq!(
            err(&text),
            "peer 2 (\"host2\"): short_id: invalid type: string \"2\", expected i64"
        );
        let text = "[[peer]]\nname = 1\nnickname = \"h\"\nshort_id = 1\naddress = \"10.0.0.1\"\n";
        assert_eq!(
            err(text),
            "peer 1 (\"h\"): name: invalid type: integer `1`, expected a string"
        );
        let text = "[[peer]]\nname = \"aa:00:00:00:00:01\"\nnickname = 5\nshort_id = 1\naddress = \"10.0.0.1\"\n";
        assert_eq!(
            err(text),
            "peer 1: nickname: invalid type: integer `5`, expected a string"
        );
        let text = two_with_second("aa:00:00:00:00:02", "host2", "2", "10.0.0.2")
            .replace("address = \"10.0.0.2\"", "address = [10, 0, 0, 2]");
        assert_eq!(
            err(&text),
            "peer 2 (\"host2\"): address: invalid type: sequence, expected a string"
        );
    }

    #[test]
    fn bad_name() {
        assert_eq!(
            err(&two_with_second("aa:00:00:00:02", "host2", "2", "10.0.0.2")),
            "peer 2 (\"host2\"): name: \"aa:00:00:00:02\" is not a peer name \
             (expected six hex octets separated by ':', like aa:00:00:00:00:01)"
        );
        assert_eq!(
            err(&two_with_second(
                "00:00:00:00:00:00",
                "host2",
                "2",
                "10.0.0.2"
            )),
            "peer 2 (\"host2\"): name 00:00:00:00:00:00 is reserved (it means \"unknown peer\")"
        );
    }

    #[test]
    fn bad_address() {
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "host2",
                "2",
                "10.0.0.256"
            )),
            "peer 2 (\"host2\"): address \"10.0.0.256\" is not an IPv4 address (like 192.168.48.11)"
        );
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "host2",
                "2",
                "fe80::1"
            )),
            "peer 2 (\"host2\"): address \"fe80::1\" is not an IPv4 address (like 192.168.48.11)"
        );
        for addr in ["0.0.0.0", "255.255.255.255", "224.0.0.1"] {
            assert_eq!(
                err(&two_with_second("aa:00:00:00:00:02", "host2", "2", addr)),
                format!("peer 2 (\"host2\"): address \"{addr}\" is not a unicast address")
            );
        }
    }

    #[test]
    fn bad_nicknames() {
        assert_eq!(
            err(&two_with_second("aa:00:00:00:00:02", "", "2", "10.0.0.2")),
            "peer 2 (\"\"): nickname must not be empty"
        );
        let long = "x".repeat(65);
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                &long,
                "2",
                "10.0.0.2"
            )),
            format!("peer 2 (\"{long}\"): nickname is longer than 64 characters")
        );
        let ok = "é".repeat(64);
        assert!(
            PeersFile::parse(&two_with_second("aa:00:00:00:00:02", &ok, "2", "10.0.0.2")).is_ok()
        );
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "my host",
                "2",
                "10.0.0.2"
            )),
            "peer 2 (\"my host\"): nickname \"my host\" contains whitespace or control characters"
        );
        assert_eq!(
            err(&two_with_second(
                "aa:00:00:00:00:02",
                "a\\u001bb",
                "2",
                "10.0.0.2"
            )),
            "peer 2 (\"a\\u{1b}b\"): nickname \"a\\u{1b}b\" contains whitespace or control characters"
        );
    }

    #[test]
    fn duplicates_name_both_entries() {
        let base = entry("aa:00:00:00:00:01", "host1", "1", "10.0.0.1")
            + &entry("aa:00:00:00:00:02", "host2", "2", "10.0.0.2");
        assert_eq!(
            err(&(base.clone() + &entry("aa:00:00:00:00:01", "host3", "3", "10.0.0.3"))),
            "peer 1 (\"host1\") and peer 3 (\"host3\") have the same name aa:00:00:00:00:01"
        );
        assert_eq!(
            err(&(base.clone() + &entry("aa:00:00:00:00:03", "host3", "2", "10.0.0.3"))),
            "peer 2 (\"host2\") and peer 3 (\"host3\") have the same short_id 2"
        );
        assert_eq!(
            err(&(base + &entry("aa:00:00:00:00:03", "host3", "3", "10.0.0.1"))),
            "peer 1 (\"host1\") and peer 3 (\"host3\") have the same address 10.0.0.1"
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-peers-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn load_reads_file_and_names_it_in_errors() {
        let dir = temp_dir("load");
        let good = dir.join("peers.toml");
        std::fs::write(&good, GOOD).unwrap();
        let file = PeersFile::load(&good).unwrap();
        assert_eq!(file.peers.len(), 3);
        assert_eq!(file.path.as_deref(), Some(good.as_path()));
        let me: PeerName = "aa:00:00:00:00:07".parse().unwrap();
        assert_eq!(
            file.split(&me).unwrap_err().to_string(),
            format!(
                "--name aa:00:00:00:00:07: not found in peers file {}",
                good.display()
            )
        );

        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            two_with_second("aa:00:00:00:00:02", "host2", "5000", "10.0.0.2"),
        )
        .unwrap();
        assert_eq!(
            PeersFile::load(&bad).unwrap_err().to_string(),
            format!(
                "peers file {}: peer 2 (\"host2\"): short_id 5000 is out of range 0..=4095",
                bad.display()
            )
        );

        let missing = dir.join("missing.toml");
        assert_eq!(
            PeersFile::load(&missing).unwrap_err().to_string(),
            format!(
                "cannot read peers file {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        let e = PeersFile::load(&dir).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read peers file {}: ", dir.display())),
            "{e}"
        );
        assert!(e.contains("os error 21"), "{e}");

        let big = dir.join("big.toml");
        std::fs::write(&big, "#".repeat(MAX_FILE_BYTES as usize + 1)).unwrap();
        assert!(matches!(
            PeersFile::load(&big),
            Err(PeersError::TooLarge { .. })
        ));

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
