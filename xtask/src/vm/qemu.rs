//! Booting the guest in QEMU: the accelerator (KVM when a probe boot shows it works,
//! TCG otherwise, or `WEFT_VM_ACCEL`), the console streamed to stdout with a prefix
//! and into a log file while [`Report`] collects the markers, and an overall timeout.
//! QEMU dies with xtask (`PR_SET_PDEATHSIG`), on a timeout, and on any early return.

use std::{
    fs::{self, File},
    io::{Read, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::report::Report;
use crate::arch::Arch;

/// Chooses the accelerator instead of the probe: `kvm` or `tcg`.
pub const ACCEL_ENV: &str = "WEFT_VM_ACCEL";
/// How long the KVM probe boot may take to reach `/init`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Prefix of the guest's console lines on stdout.
const PREFIX: &str = "vm| ";

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation: slow, works everywhere.
    Tcg,
}

impl Accel {
    /// `-accel` and `-cpu` for QEMU (and `-M` for arm64). An arm64 guest under TCG
    /// gets a Cortex-A72: `max` emulates pointer authentication, 3-4 times slower.
    fn args(self, arch: Arch) -> Vec<&'static str> {
        match (arch, self) {
            (Arch::X86_64, Self::Kvm) => vec!["-accel", "kvm", "-cpu", "host"],
            (Arch::X86_64, Self::Tcg) => vec!["-accel", "tcg", "-cpu", "max"],
            (Arch::Aarch64, Self::Kvm) => vec!["-M", "virt", "-accel", "kvm", "-cpu", "host"],
            (Arch::Aarch64, Self::Tcg) => {
                vec!["-M", "virt", "-accel", "tcg", "-cpu", "cortex-a72"]
            }
        }
    }

    /// The name QEMU uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// What the guest's `/init` does (`weft.mode=` on the kernel command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Print the probe marker and power off.
    Probe,
    /// Run the tests and power off.
    Test,
    /// Run the tests, then a shell on the console (stdin is the terminal).
    Shell,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Probe => "probe",
            Self::Test => "test",
            Self::Shell => "shell",
        }
    }
}

/// One boot.
#[derive(Debug)]
pub struct Boot<'a> {
    /// The guest's architecture.
    pub arch: Arch,
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The accelerator.
    pub accel: Accel,
    /// What `/init` does.
    pub mode: Mode,
    /// Overall limit; `None` for none (the interactive shell).
    pub timeout: Option<Duration>,
    /// Where the console goes besides the report; `None`: nowhere (the probe).
    pub log: Option<&'a Path>,
}

/// How a boot ended.
#[derive(Debug)]
pub enum Ended {
    /// QEMU exited by itself (the guest powered off, or QEMU failed).
    Exited(ExitStatus),
    /// The timeout struck; QEMU was killed.
    TimedOut(Duration),
}

/// What a boot produced.
#[derive(Debug)]
pub struct Outcome {
    /// The guest's markers.
    pub report: Report,
    /// How it ended.
    pub ended: Ended,
    /// Wall time from start to `/init` running, if it got there.
    pub to_init: Option<Duration>,
    /// Wall time of the whole boot.
    pub elapsed: Duration,
    /// QEMU's stderr, when captured (the probe).
    pub stderr: String,
}

/// Picks the accelerator: [`ACCEL_ENV`] when set; TCG without a usable `/dev/kvm`;
/// otherwise KVM if a probe boot with it reaches `/init` within [`PROBE_TIMEOUT`].
/// Says which and why.
pub fn choose_accel(arch: Arch, kernel: &Path, initrd: &Path) -> Result<Accel> {
    match std::env::var(ACCEL_ENV).as_deref() {
        Ok("kvm") => {
            eprintln!("vm: accelerator kvm ({ACCEL_ENV}=kvm)");
            return Ok(Accel::Kvm);
        }
        Ok("tcg") => {
            eprintln!("vm: accelerator tcg ({ACCEL_ENV}=tcg)");
            return Ok(Accel::Tcg);
        }
        Ok("") | Err(std::env::VarError::NotPresent) => {}
        Ok(other) => bail!("{ACCEL_ENV}={other}: expected `kvm` or `tcg`"),
        Err(e) => bail!("{ACCEL_ENV}: {e}"),
    }
    if arch != Arch::host()? {
        eprintln!(
            "vm: accelerator tcg (an {arch} guest on an {} host)",
            Arch::host()?
        );
        return Ok(Accel::Tcg);
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("vm: accelerator tcg (no usable /dev/kvm)");
        return Ok(Accel::Tcg);
    }
    let probe = boot(&Boot {
        arch,
        kernel,
        initrd,
        accel: Accel::Kvm,
        mode: Mode::Probe,
        timeout: Some(PROBE_TIMEOUT),
        log: None,
    })?;
    if probe.report.probe_ok {
        eprintln!(
            "vm: accelerator kvm (probe boot reached /init in {:.1}s)",
            probe.elapsed.as_secs_f64()
        );
        return Ok(Accel::Kvm);
    }
    let why = match probe.ended {
        Ended::TimedOut(after) => format!("the guest did not reach /init within {after:?}"),
        Ended::Exited(status) => {
            let last = probe.stderr.lines().rev().find(|l| !l.trim().is_empty());
            format!(
                "QEMU exited ({status}) before /init ran{}",
                last.map(|l| format!(": {}", l.trim())).unwrap_or_default()
            )
        }
    };
    eprintln!(
        "vm: accelerator tcg (KVM probe failed in {:.1}s: {why}; set {ACCEL_ENV} to skip it)",
        probe.elapsed.as_secs_f64()
    );
    Ok(Accel::Tcg)
}

/// Boots once and waits for the end: the guest powering off, or the timeout.
pub fn boot(boot: &Boot<'_>) -> Result<Outcome> {
    let (qemu_binary, serial) = match boot.arch {
        Arch::X86_64 => ("qemu-system-x86_64", "ttyS0"),
        Arch::Aarch64 => ("qemu-system-aarch64", "ttyAMA0"),
    };
    let mut cmd = Command::new(qemu_binary);
    cmd.args(boot.accel.args(boot.arch))
        .args(["-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .args(["-nic", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        .arg("-append")
        .arg(format!(
            "console={serial} loglevel=4 panic=-1 weft.mode={}",
            boot.mode.name()
        ))
        .stdout(Stdio::piped());
    if boot.mode == Mode::Shell {
        cmd.stdin(Stdio::inherit());
    } else {
        cmd.stdin(Stdio::null());
    }
    let capture_stderr = boot.log.is_none();
    if capture_stderr {
        cmd.stderr(Stdio::piped());
    }
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU gets SIGKILL when xtask dies (Ctrl-C, a CI timeout).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if boot.mode != Mode::Probe {
        eprintln!("$ {}", crate::exec::render(&cmd));
    }
    let log = boot
        .log
        .map(|path| File::create(path).with_context(|| format!("creating {}", path.display())))
        .transpose()?;
    let started = Instant::now();
    let mut qemu = Guard(
        cmd.spawn()
            .with_context(|| format!("could not start {qemu_binary} (`cargo xtask setup`)"))?,
    );
    let shared = Arc::new(Mutex::new((Report::default(), None::<Duration>)));
    let stdout = qemu.0.stdout.take().context("qemu has no stdout")?;
    let echo = boot.mode != Mode::Probe;
    let reader = {
        let shared = Arc::clone(&shared);
        thread::spawn(move || console(stdout, log, echo, &shared, started))
    };
    let stderr = qemu.0.stderr.take().map(|mut err| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        })
    });
    let ended = loop {
        if let Some(status) = qemu.0.try_wait().context("waiting for qemu")? {
            break Ended::Exited(status);
        }
        if let Some(limit) = boot.timeout
            && started.elapsed() >= limit
        {
            qemu.kill();
            break Ended::TimedOut(limit);
        }
        thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    if reader.join().is_err() {
        bail!("the console reader panicked");
    }
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    let (report, to_init) =
        std::mem::take(&mut *shared.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Outcome {
        report,
        ended,
        to_init,
        elapsed,
        stderr,
    })
}

/// Kills and reaps QEMU when dropped (an error, a panic, a timeout).
struct Guard(Child);

impl Guard {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// Reads the console until QEMU exits: echoes it (each line prefixed, partial lines
/// such as a shell prompt at once), appends it to `log`, and feeds whole lines to the
/// report, noting when `/init` started.
fn console(
    mut stdout: impl Read,
    mut log: Option<File>,
    echo: bool,
    shared: &Mutex<(Report, Option<Duration>)>,
    started: Instant,
) {
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    let mut at_line_start = true;
    let out = std::io::stdout();
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(log) = log.as_mut() {
            let _ = log.write_all(chunk);
        }
        if echo {
            let mut out = out.lock();
            for piece in chunk.split_inclusive(|&b| b == b'\n') {
                if at_line_start {
                    let _ = out.write_all(PREFIX.as_bytes());
                }
                let _ = out.write_all(piece);
                at_line_start = piece.ends_with(b"\n");
            }
            let _ = out.flush();
        }
        for &byte in chunk {
            if byte == b'\n' {
                let text = String::from_utf8_lossy(&line);
                let mut guard = shared.lock().unwrap_or_else(PoisonError::into_inner);
                let (report, to_init) = &mut *guard;
                report.feed(&text);
                if to_init.is_none() && report.kernel.is_some() {
                    *to_init = Some(started.elapsed());
                }
                line.clear();
            } else {
                line.push(byte);
            }
        }
    }
}
