//! The one way xtask runs a command: print it, run it, and turn a failure into an error
//! that names the command line and its exit status.

use std::{
    ffi::OsStr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Prints `cmd` (with the environment variables set on it), runs it with inherited
/// stdio and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    exec(cmd, false).map(drop)
}

/// Like [`run`], but captures and returns stdout (stderr still goes to the terminal).
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = exec(cmd, true)?;
    String::from_utf8(out).with_context(|| format!("`{}` printed non-UTF-8", render(cmd)))
}

fn exec(cmd: &mut Command, capture: bool) -> Result<Vec<u8>> {
    let line = render(cmd);
    eprintln!("$ {line}");
    let out = if capture {
        cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output()
    } else {
        cmd.status().map(|status| std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }
    .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed: {}", out.status);
    }
    Ok(out.stdout)
}

/// The command as a shell line: `KEY=value program args...`. A `PATH` that extends
/// xtask's own ends in `$PATH` instead of repeating it.
pub fn render(cmd: &Command) -> String {
    let inherited_path = std::env::var("PATH").unwrap_or_default();
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        if key == "PATH"
            && !inherited_path.is_empty()
            && let Some(front) = value
                .to_str()
                .and_then(|v| v.strip_suffix(inherited_path.as_str()))
            && front.ends_with(':')
        {
            return Some(format!("PATH={}$PATH", quote(OsStr::new(front))));
        }
        Some(format!("{}={}", key.to_string_lossy(), quote(value)))
    });
    let words = std::iter::once(quote(cmd.get_program())).chain(cmd.get_args().map(quote));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// Quotes a word for a POSIX shell when it needs it; control characters (the 0x1f
/// separator of `CARGO_ENCODED_RUSTFLAGS`) are shown as `$'\x1f'` escapes.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.into_owned();
    }
    if word.chars().any(char::is_control) {
        let mut out = String::from("$'");
        for c in word.chars() {
            match c {
                '\'' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('\'');
        return out;
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_env_and_quotes() {
        let mut cmd = Command::new("cargo");
        cmd.arg("build")
            .arg("it's here")
            .env("FLAGS", "--cfg=a=\"b\"\x1f-Cx");
        assert_eq!(
            render(&cmd),
            r#"FLAGS=$'--cfg=a="b"\x1f-Cx' cargo build 'it'\''s here'"#
        );
    }

    #[test]
    fn extended_path_is_abbreviated() {
        let path = std::env::var("PATH").unwrap();
        let mut cmd = Command::new("true");
        cmd.env("PATH", format!("/opt/tools/bin:{path}"));
        assert_eq!(render(&cmd), "PATH=/opt/tools/bin:$PATH true");
    }

    #[test]
    fn failure_names_command_and_status() {
        let err = run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err();
        assert_eq!(err.to_string(), "`sh -c 'exit 3'` failed: exit status: 3");
    }

    #[test]
    fn output_captures_stdout() {
        let out = output(Command::new("sh").args(["-c", "echo hi"])).unwrap();
        assert_eq!(out, "hi\n");
    }
}
