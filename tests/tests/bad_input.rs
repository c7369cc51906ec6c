//! Bad input: the agent exits nonzero with a clear message, without panicking and
//! without leaving devices, pins or sockets behind, also when it fails after it
//! created kernel objects. Need root and `WEFT_AGENT_BIN`.

mod common;

use std::{path::Path, time::Duration};

use common::{Bed, Must, agent_bin, bed};
use weft_common::maps::programs;
use weft_testbed::{links_with_prefix, ns_exec};

/// Runs the agent on host 1 with `args`, expecting a clean failure whose output
/// mentions (case-insensitively) at least one of each group in `mentions`.
fn expect_failure(tb: &Bed, bin: &Path, args: Vec<String>, case: &str, mentions: &[&[&str]]) {
    let exit = tb
        .run_agent_to_exit(1, bin, &args, Duration::from_secs(10))
        .must(&format!("{case}: agent should exit by itself"));
    let out = exit.output.to_lowercase();
    assert!(
        exit.status.code().is_some_and(|c| c != 0),
        "{case}: expected a nonzero exit code, got {:?}; output:\n{}",
        exit.status,
        exit.output
    );
    assert!(
        !out.contains("panicked"),
        "{case}: the agent panicked:\n{}",
        exit.output
    );
    for group in mentions {
        assert!(
            group.iter().any(|m| out.contains(&m.to_lowercase())),
            "{case}: expected the message to mention one of {group:?}; output:\n{}",
            exit.output
        );
    }
    assert_nothing_left(tb, case);
}

/// Asserts host 1 has no weft device, no pins and no socket, and that its bridge
/// (the testbed's) carries no mark of weft's.
fn assert_nothing_left(tb: &Bed, case: &str) {
    let ns = &tb.host(1).must("host").ns;
    let left = links_with_prefix(ns, "weft-").must("ip link");
    assert!(left.is_empty(), "{case}: devices left behind: {left:?}");
    let bridge = ns_exec(ns, &["ip", "link", "show", "weave"]).must("ip link");
    assert!(
        !bridge.contains("alias weft"),
        "{case}: the testbed's bridge was marked as weft's:\n{bridge}"
    );
    assert_eq!(
        pin_dirs(tb),
        0,
        "{case}: pins left behind in {}",
        tb.bpffs_dir().display()
    );
    assert!(!tb.socket_path(1).exists(), "{case}: socket left behind");
}

/// Runs host 1's agent with its usual arguments and expects it to fail with a
/// message containing `mention`.
fn fails_naming(tb: &Bed, bin: &Path, mention: &str) {
    let exit = tb
        .run_agent_to_exit(
            1,
            bin,
            &tb.agent_args(1).must("args"),
            Duration::from_secs(10),
        )
        .must("the agent exits");
    assert!(!exit.status.success(), "expected failure:\n{}", exit.output);
    assert!(
        exit.output.contains(mention),
        "expected {mention:?} in:\n{}",
        exit.output
    );
}

/// How many agents' pin directories exist under the testbed's bpffs directory.
fn pin_dirs(tb: &Bed) -> usize {
    std::fs::read_dir(tb.bpffs_dir().join("weft"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Adds a VXLAN device weft did not create to namespace `ns`.
fn add_foreign_vxlan(ns: &str, name: &str, id: &str, port: &str) {
    ns_exec(
        ns,
        &[
            "ip",
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "id",
            id,
            "dstport",
            port,
            "local",
            "192.168.48.11",
        ],
    )
    .must("a foreign VXLAN device");
}

/// The VXLAN port is taken (here by a kernel VXLAN device on 6784): creating weft's
/// device fails after the bridge and the pins were made, and both are removed.
#[test]
fn vxlan_port_in_use_fails_after_setup_began_and_rolls_back() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let ns = tb.host(1).must("host").ns.clone();
    add_foreign_vxlan(&ns, "other0", "7", "6784");
    ns_exec(&ns, &["ip", "link", "set", "other0", "up"]).must("up");
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "VXLAN port in use",
        &[&["weft-vxlan"]],
    );
    assert_eq!(
        links_with_prefix(&ns, "other0").must("ip link"),
        ["other0"],
        "the foreign device is untouched"
    );
}

/// A device named like weft's that weft did not create is neither used, replaced nor
/// removed.
#[test]
fn foreign_device_of_weft_name_is_left_alone() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let ns = tb.host(1).must("host").ns.clone();
    add_foreign_vxlan(&ns, "weft-vxlan", "9", "4789");
    fails_naming(&tb, &bin, "not created by weft");
    let link = ns_exec(&ns, &["ip", "-d", "link", "show", "weft-vxlan"])
        .must("the foreign device still exists");
    assert!(link.contains("id 9"), "untouched:\n{link}");
    assert_eq!(pin_dirs(&tb), 0, "pins rolled back");
    assert!(!tb.socket_path(1).exists(), "socket removed");
}

fn with_arg(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("flag present");
    args[i + 1] = value.to_string();
    args
}

/// Host 1's agent arguments plus `flag value`.
fn args_plus(tb: &Bed, flag: &str, value: &str) -> Vec<String> {
    let mut args = tb.agent_args(1).must("args");
    args.extend([flag.to_owned(), value.to_owned()]);
    args
}

/// [`expect_failure`] on a fresh two-host testbed whose host 1 runs the agent with
/// its usual arguments plus `flag value`; returns the testbed for further checks.
fn expect_failure_plus(flag: &str, value: &str, case: &str, mentions: &[&[&str]]) -> Bed {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    expect_failure(&tb, &bin, args_plus(&tb, flag, value), case, mentions);
    tb
}

fn peers(entries: &[(&str, &str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, nick, id, addr)| {
            let mut s = String::from("[[peer]]\n");
            for (k, v) in [
                ("name", name),
                ("nickname", nick),
                ("short_id", id),
                ("address", addr),
            ] {
                if !v.is_empty() {
                    s.push_str(&format!("{k} = {v}\n"));
                }
            }
            s + "\n"
        })
        .collect()
}

fn write(tb: &Bed, text: &str) {
    std::fs::write(tb.peers_path(1), text).expect("write peers file");
}

const H1: (&str, &str, &str, &str) = (
    "\"aa:00:00:00:00:01\"",
    "\"host1\"",
    "1",
    "\"192.168.48.11\"",
);

#[test]
fn missing_interface() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let args = with_arg(tb.agent_args(1).must("args"), "--iface", "nosuch0");
    expect_failure(&tb, &bin, args, "missing interface", &[&["nosuch0"]]);
}

#[test]
fn malformed_address_in_peers_file() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    write(
        &tb,
        &peers(&[
            H1,
            (
                "\"aa:00:00:00:00:02\"",
                "\"host2\"",
                "2",
                "\"192.168.48.999\"",
            ),
        ]),
    );
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "malformed address",
        &[
            &["address"],
            &["192.168.48.999", "aa:00:00:00:00:02", "host2", "peer 2"],
        ],
    );
}

#[test]
fn missing_field_in_peers_file() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    write(
        &tb,
        &peers(&[
            H1,
            (
                "\"aa:00:00:00:00:02\"",
                "\"host2\"",
                "",
                "\"192.168.48.12\"",
            ),
        ]),
    );
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "missing short_id",
        &[&["short_id"]],
    );
}

#[test]
fn duplicate_short_id() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    write(
        &tb,
        &peers(&[
            H1,
            (
                "\"aa:00:00:00:00:02\"",
                "\"host2\"",
                "1",
                "\"192.168.48.12\"",
            ),
        ]),
    );
    expect_failure(
        &tb,
        &bin,
        tb.agent_args(1).must("args"),
        "duplicate short_id",
        &[
            &["short_id", "short id", "shortid"],
            &["duplicate", "twice", "already", "more than once", "same"],
        ],
    );
}

#[test]
fn own_name_absent_from_peers_file() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let args = with_arg(tb.agent_args(1).must("args"), "--name", "aa:00:00:00:00:99");
    expect_failure(
        &tb,
        &bin,
        args,
        "own name absent",
        &[&["aa:00:00:00:00:99"]],
    );
}

#[test]
fn no_bpf_privileges() {
    use std::os::unix::fs::PermissionsExt;

    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    // An unprivileged user must be able to reach the binary and the peers file.
    let dir = std::env::temp_dir().join(format!("weft-nopriv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("temp dir: {e}"));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod dir: {e}"));
    let copy = dir.join("weft");
    std::fs::copy(&bin, &copy).unwrap_or_else(|e| panic!("copy agent: {e}"));
    let peers = dir.join("peers.toml");
    std::fs::copy(tb.peers_path(1), &peers).unwrap_or_else(|e| panic!("copy peers file: {e}"));
    std::fs::set_permissions(&peers, std::fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let mut args: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]
    .map(String::from)
    .to_vec();
    args.push(copy.display().to_string());
    args.extend(with_arg(
        tb.agent_args(1).must("args"),
        "--peers-file",
        &peers.display().to_string(),
    ));
    expect_failure(
        &tb,
        Path::new("setpriv"),
        args,
        "running as an unprivileged user",
        &[&["permission denied"], &["root", "cap_bpf"]],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn underlay_mtu_too_small() {
    // 1451 + 50 bytes of encapsulation do not fit the underlay's 1500.
    expect_failure_plus(
        "--mtu",
        "1451",
        "underlay MTU too small",
        &[&["--mtu 1451"], &["at least 1501"], &["eth0 has 1500"]],
    );
}

/// Fails after the eBPF object is loaded and the control socket bound, before any
/// device is created.
#[test]
fn bridge_name_taken_by_another_device() {
    let tb = expect_failure_plus(
        "--bridge",
        "eth0",
        "bridge name taken",
        &[&["eth0"], &["not a bridge"]],
    );
    let ns = &tb.host(1).must("host").ns;
    let eth0 = ns_exec(ns, &["ip", "-o", "link", "show", "eth0"]).must("eth0 still there");
    assert!(eth0.contains("state UP"), "eth0 left as it was:\n{eth0}");
}

/// The latest failure there is: pinning the second program's link, after the agent
/// created its VXLAN device, filled its (new) maps, attached the first program and
/// pinned its link. A directory already stands where the decapsulation link's pin
/// goes (in a pin directory that exists, so the agent did not create it). Everything
/// the run made goes again; the directory that was there stays.
#[test]
fn failure_pinning_the_last_link_rolls_everything_back() {
    let bin = agent_bin();
    let tb = bed(2, 0);
    tb.write_peers(1, &[1, 2]).must("peers");
    let ns = tb.host(1).must("host").ns.clone();
    let cookie = weft_testbed::netns::cookie(&ns).must("netns cookie");
    let root = tb
        .bpffs_dir()
        .join("weft")
        .join(weft_common::netns::pin_dir_name(cookie));
    let blocker = root.join("links").join(programs::INGRESS);
    std::fs::create_dir_all(&blocker).unwrap_or_else(|e| panic!("{}: {e}", blocker.display()));
    fails_naming(&tb, &bin, "pinning the link of weft_decap");
    let left = links_with_prefix(&ns, "weft-").must("ip link");
    assert!(
        left.is_empty(),
        "the device the run created is gone: {left:?}"
    );
    let mut entries: Vec<String> = walk(&root);
    entries.sort();
    assert_eq!(
        entries,
        [format!("links/{}/", programs::INGRESS)],
        "only the blocking directory remains in the pin directory"
    );
    assert!(!tb.socket_path(1).exists(), "socket removed");
}

/// Paths below `dir`, relative, directories with a trailing `/` when empty.
fn walk(dir: &Path) -> Vec<String> {
    fn go(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let entries: Vec<_> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        if entries.is_empty() && dir != base {
            let rel = dir.strip_prefix(base).unwrap_or(dir).display();
            out.push(format!("{rel}/"));
        }
        for e in entries {
            let path = e.path();
            if path.is_dir() {
                go(base, &path, out);
            } else {
                out.push(
                    path.strip_prefix(base)
                        .unwrap_or(&path)
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = Vec::new();
    go(dir, dir, &mut out);
    out
}
