//! SIGHUP reloads the peers file: a new host becomes reachable without a restart and
//! traffic between unchanged peers carries on. Need root and `WEFT_AGENT_BIN`.

mod common;

use common::{FIRST_CONTACT, Must, agent_bin, bed, start_agents};
use weft_testbed::{ping, ping_unanswered, wait_ping};

#[test]
fn sighup_adds_a_peer_without_restart() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    tb.write_peers(1, &[1, 2]).must("peers host1");
    tb.write_peers(2, &[1, 2]).must("peers host2");
    tb.write_peers(3, &[1, 2, 3]).must("peers host3");
    start_agents(&mut tb, &bin, &[1, 2, 3]);
    let pods: Vec<_> = tb.pods().cloned().collect();
    let (p1, p2, p3) = (pods[0].clone(), pods[1].clone(), pods[2].clone());
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("h1 <-> h2 before reload");
    ping_unanswered(&p3, p1.addr, 3)
        .must("host1 does not know host3 yet, so host3's pod must not reach host1's");
    let pid1 = tb.agent_pid(1).must("pid");
    let pid2 = tb.agent_pid(2).must("pid");

    // Keep h1 <-> h2 busy across the reload.
    let (a, b) = (p1.clone(), p2.addr);
    let background = std::thread::spawn(move || ping(&a, b, 30));
    std::thread::sleep(std::time::Duration::from_secs(1));
    for n in [1u8, 2] {
        tb.write_peers(n, &[1, 2, 3]).must("rewrite peers");
        tb.sighup_agent(n).must("SIGHUP");
    }
    for (a, b) in [(&p3, &p1), (&p1, &p3), (&p2, &p3), (&p3, &p2)] {
        wait_ping(a, b.addr, FIRST_CONTACT).must(&format!(
            "{} -> {} after reload",
            a.label(),
            b.label()
        ));
    }
    let steady = background
        .join()
        .expect("ping thread")
        .must("h1 -> h2 during reload");
    assert_eq!(
        steady.received, steady.transmitted,
        "h1 -> h2 lost packets across the reload: {steady:?}"
    );
    assert_eq!(
        tb.agent_pid(1).must("pid"),
        pid1,
        "host1's agent restarted instead of reloading"
    );
    assert_eq!(
        tb.agent_pid(2).must("pid"),
        pid2,
        "host2's agent restarted instead of reloading"
    );
    let s = tb.status_json(1).must("status");
    let conns = s["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("no connections in {s}"));
    assert!(
        conns.iter().any(|c| c["short_id"] == 3),
        "host1 lists host3 after reload: {s}"
    );
}

/// SIGHUP with a peer removed: it disappears from status and its traffic stops.
#[test]
fn sighup_removes_a_peer() {
    let bin = agent_bin();
    let mut tb = bed(3, 1);
    start_agents(&mut tb, &bin, &[1, 2, 3]);
    let pods: Vec<_> = tb.pods().cloned().collect();
    let (p1, p2, p3) = (pods[0].clone(), pods[1].clone(), pods[2].clone());
    wait_ping(&p1, p3.addr, FIRST_CONTACT).must("h1 -> h3 before reload");

    tb.write_peers(1, &[1, 2]).must("rewrite peers");
    tb.sighup_agent(1).must("SIGHUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let s = tb.status_json(1).must("status");
        let gone = s["connections"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["short_id"] != 3));
        if gone {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host3 still listed after the reload: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ping_unanswered(&p1, p3.addr, 2).must("host1 no longer carries traffic to the removed host3");
    wait_ping(&p1, p2.addr, FIRST_CONTACT).must("h1 -> h2 still works");
}
