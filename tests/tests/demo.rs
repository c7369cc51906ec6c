//! The demo (`cargo xtask demo`) runs end to end and leaves nothing behind.
//! Needs root and `WEFT_AGENT_BIN`.

mod common;

use common::agent_bin;

#[test]
fn demo_runs_and_tears_down() {
    let bin = agent_bin();
    weft_testbed::demo(&bin).unwrap_or_else(|e| panic!("demo failed: {e:#}"));
    let me = format!(
        "{}{}-",
        weft_testbed::testbed::DEFAULT_TAG,
        std::process::id()
    );
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let left: Vec<&String> = left.iter().filter(|n| n.starts_with(&me)).collect();
    assert!(left.is_empty(), "namespaces left by the demo: {left:?}");
}
