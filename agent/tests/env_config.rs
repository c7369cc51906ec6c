//! `weft run` configured from the environment, as Weave's DaemonSet configures
//! weaver: every case here fails before the agent touches the system (argument and
//! password checks come first), so it needs no privileges.

use std::process::{Command, Output};

/// A password that must never appear in any output.
const SECRET: &str = "pw-6f1c2d9a-never-printed";

/// Runs `weft run ARGS` with only `env` in its environment.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .arg("run")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("running weft")
}

/// Asserts `weft run` failed (nonzero, no panic, the secret not shown) with a
/// message containing every one of `mentions`; returns the message.
fn fails(args: &[&str], env: &[(&str, &str)], mentions: &[&str]) -> String {
    let out = run(args, env);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{env:?}: expected failure:\n{text}");
    assert!(!text.contains("panicked"), "{env:?}: panic:\n{text}");
    assert!(
        !text.contains(SECRET),
        "{env:?}: the password shown:\n{text}"
    );
    for m in mentions {
        assert!(text.contains(m), "{env:?}: expected {m:?} in:\n{text}");
    }
    text
}

#[test]
fn bad_values_name_their_variable() {
    for (var, value, flag) in [
        ("WEAVE_MTU", "70000", "--mtu"),
        ("WEAVE_MTU", "abc", "--mtu"),
        ("CONN_LIMIT", "many", "--conn-limit"),
        ("WEAVE_NO_FASTDP", "maybe", "--no-fastdp"),
        ("WEFT_ENCRYPT_NETWORK", "perhaps", "--encrypt-network"),
        ("WEAVE_HTTP_ADDR", "localhost", "--http-addr"),
        ("WEAVE_METRICS_ADDR", "6782", "--status-addr"),
    ] {
        let text = fails(
            &[],
            &[(var, value), ("WEAVE_PASSWORD", SECRET)],
            &[flag, value, &format!("environment variable {var}")],
        );
        assert_eq!(run(&[], &[(var, value)]).status.code(), Some(2), "{text}");
    }
    // A flag on the command line wins, and its error does not blame the variable.
    let text = fails(&["--mtu", "100"], &[("WEAVE_MTU", "1376")], &["--mtu"]);
    assert!(!text.contains("environment variable"), "{text}");
}

#[test]
fn encryption_required_without_password_names_the_secret() {
    for on in ["true", "1", "yes", "on"] {
        fails(
            &[],
            &[("WEFT_ENCRYPT_NETWORK", on)],
            &["no password", "weave-passwd", "--encrypt-network=false"],
        );
    }
    // The flag, and an empty WEAVE_PASSWORD (unset, as in Weave's launch script).
    fails(
        &["--encrypt-network", "true"],
        &[("WEAVE_PASSWORD", "")],
        &["no password", "weave-passwd"],
    );
    // Empty variables count as unset: the run gets past argument parsing to the
    // encryption check.
    fails(
        &[],
        &[
            ("WEFT_ENCRYPT_NETWORK", "true"),
            ("WEAVE_MTU", ""),
            ("CONN_LIMIT", ""),
            ("WEAVE_NO_FASTDP", ""),
            ("HOSTNAME", ""),
            ("KUBE_PEERS", ""),
        ],
        &["no password"],
    );
}

#[test]
fn password_checks_before_anything_else() {
    // With a password, encryption on passes; the next check (KUBE_PEERS) fails.
    fails(
        &[],
        &[
            ("WEFT_ENCRYPT_NETWORK", "true"),
            ("WEAVE_PASSWORD", SECRET),
            ("KUBE_PEERS", "10.0.0.1  host:0"),
        ],
        &["KUBE_PEERS", "\"host:0\"", "not a port"],
    );
    // Encryption off ignores the password, even an unreadable password file.
    fails(
        &["--password-file", "/nonexistent/weft-password"],
        &[
            ("WEFT_ENCRYPT_NETWORK", "false"),
            ("KUBE_PEERS", "10.0.0.1 a/b"),
        ],
        &["KUBE_PEERS", "\"a/b\""],
    );
    // Unless it is on: then the file must be read.
    fails(
        &["--password-file", "/nonexistent/weft-password"],
        &[("WEFT_ENCRYPT_NETWORK", "true")],
        &["reading the password file"],
    );
}

#[test]
fn static_mode_refuses_encryption() {
    fails(
        &[
            "--name",
            "aa:00:00:00:00:01",
            "--peers-file",
            "/nonexistent/p.toml",
        ],
        &[("WEFT_ENCRYPT_NETWORK", "true")],
        &["static mode", "no encryption"],
    );
}
