//! What the guest reported: the `WEFT-VM:` marker lines its `/init` prints on the
//! console (see `xtask/vm/init`), gathered line by line while the VM runs.

/// The marker every line meant for the host starts with.
pub const MARKER: &str = "WEFT-VM: ";

/// How one test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It passed.
    Pass,
    /// It failed (or was killed at the per-test limit).
    Fail,
}

/// One test's result.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    /// `<file>::<test name>`.
    pub name: String,
    /// How it ended.
    pub verdict: Verdict,
    /// Its run time in the guest, in seconds.
    pub secs: f64,
}

/// Everything the guest reported so far.
#[derive(Debug, Default)]
pub struct Report {
    /// `uname -r` of the guest, once `/init` runs.
    pub kernel: Option<String>,
    /// The guest's uptime in seconds when `/init` started.
    pub init_uptime: Option<f64>,
    /// The probe boot reached `/init`.
    pub probe_ok: bool,
    /// The test that started last and has not ended (the culprit of a timeout).
    pub running: Option<String>,
    /// Finished tests, in order.
    pub results: Vec<TestResult>,
    /// Selected test files whose filters matched no test.
    pub unmatched: Vec<String>,
    /// `/init` finished its list.
    pub done: bool,
}

impl Report {
    /// Takes one console line (trailing `\r` and kernel messages around the marker
    /// are tolerated).
    pub fn feed(&mut self, line: &str) {
        let Some(at) = line.find(MARKER) else {
            return;
        };
        let rest = line[at + MARKER.len()..].trim_end();
        if let Some(fields) = rest.strip_prefix("init ") {
            for field in fields.split_whitespace() {
                if let Some(kernel) = field.strip_prefix("kernel=") {
                    self.kernel = Some(kernel.to_owned());
                } else if let Some(uptime) = field.strip_prefix("uptime=") {
                    self.init_uptime = uptime.parse().ok();
                }
            }
        } else if rest == "probe ok" {
            self.probe_ok = true;
        } else if rest.starts_with("done") {
            self.done = true;
        } else if let Some(file) = rest
            .strip_prefix("selection ")
            .and_then(|r| r.strip_suffix(" matched no test"))
        {
            self.unmatched.push(file.to_owned());
        } else if let Some(test) = rest.strip_prefix("test ") {
            self.test_line(test);
        }
    }

    /// `<name> START` or `<name> PASS|FAIL (<secs>s)`.
    fn test_line(&mut self, test: &str) {
        if let Some(name) = test.strip_suffix(" START") {
            self.running = Some(name.to_owned());
            return;
        }
        let mut words = test.rsplitn(3, ' ');
        let (Some(secs), Some(verdict), Some(name)) = (words.next(), words.next(), words.next())
        else {
            return;
        };
        let verdict = match verdict {
            "PASS" => Verdict::Pass,
            "FAIL" => Verdict::Fail,
            _ => return,
        };
        let secs = secs
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix("s)"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        self.running = None;
        self.results.push(TestResult {
            name: name.to_owned(),
            verdict,
            secs,
        });
    }

    /// The tests that failed.
    pub fn failed(&self) -> impl Iterator<Item = &TestResult> {
        self.results.iter().filter(|r| r.verdict == Verdict::Fail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(lines: &[&str]) -> Report {
        let mut report = Report::default();
        for line in lines {
            report.feed(line);
        }
        report
    }

    #[test]
    fn collects_markers() {
        let r = report(&[
            "[    1.2] random kernel line",
            "WEFT-VM: init kernel=6.1.0-56-amd64 uptime=3.41\r",
            "WEFT-VM: test lifecycle::reset_refuses START",
            "test reset_refuses ... ok",
            "WEFT-VM: test lifecycle::reset_refuses PASS (12.5s)",
            "WEFT-VM: test datapath::ping START",
            "[   20.1] kernel: WEFT-VM: test datapath::ping FAIL (3.0s)",
            "WEFT-VM: selection mesh matched no test",
            "WEFT-VM: done uptime=40.00",
        ]);
        assert_eq!(r.kernel.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(r.init_uptime, Some(3.41));
        assert_eq!(r.results.len(), 2);
        assert_eq!(
            r.results[0],
            TestResult {
                name: "lifecycle::reset_refuses".into(),
                verdict: Verdict::Pass,
                secs: 12.5,
            }
        );
        assert_eq!(r.failed().count(), 1);
        assert_eq!(r.unmatched, ["mesh"]);
        assert!(r.running.is_none());
        assert!(r.done);
        assert!(!r.probe_ok);
    }

    #[test]
    fn remembers_the_test_that_never_ended() {
        let r = report(&["WEFT-VM: test datapath::ping START"]);
        assert_eq!(r.running.as_deref(), Some("datapath::ping"));
        assert!(!r.done);
    }

    #[test]
    fn ignores_malformed_markers() {
        let r = report(&[
            "WEFT-VM: test x MAYBE (1s)",
            "WEFT-VM: test",
            "WEFT-VM: bogus",
        ]);
        assert!(r.results.is_empty());
    }
}
