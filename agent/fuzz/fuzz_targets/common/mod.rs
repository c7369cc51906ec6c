//! What the connection targets share: two connections fed the same bytes, one all at
//! once and one a byte at a time, must agree; a failed connection stays failed.

use std::time::Instant;

use weft::mesh::{
    PeerName,
    connection::{Connection, ConnectionConfig, ConnectionError, Event, LocalIdentity},
    crypto::Password,
    wire::Message,
};

/// The fixed password of the password-mode targets.
pub const PASSWORD: &[u8] = b"fuzz-password";

/// Our side's configuration.
pub fn config(password: bool, outbound: bool) -> ConnectionConfig {
    ConnectionConfig {
        identity: LocalIdentity {
            name: PeerName([0xaa, 0, 0, 0, 0, 1]),
            nickname: "fuzz".into(),
            uid: 0x1122_3344_5566_7788,
            short_id: Some(1),
        },
        password: password.then(|| Password::new(PASSWORD)),
        overlays: Some("fastdp sleeve".into()),
        trusted: false,
        fast_heartbeat: true,
        outbound,
        conn_id: 0x0102_0304_0506_0708,
        key_random: [0x42; 32],
    }
}

/// What a connection did with its input.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub events: Vec<Event>,
    pub error: Option<ConnectionError>,
    pub output: Vec<u8>,
    pub ready: bool,
}

fn drain(c: &mut Connection, events: &mut Vec<Event>) {
    while let Some(e) = c.poll_event() {
        events.push(e);
    }
}

/// Feeds `chunks` in order (stopping at the first error) and checks the invariants of
/// a failed connection.
pub fn run(c: &mut Connection, chunks: &[&[u8]], now: Instant) -> Outcome {
    let mut events = Vec::new();
    let mut output = c.take_output();
    let mut error = None;
    for chunk in chunks {
        let res = c.receive(chunk, now);
        drain(c, &mut events);
        output.extend(c.take_output());
        if let Err(e) = res {
            assert_ne!(e, ConnectionError::Closed, "first error is the real one");
            error = Some(e);
            break;
        }
        // Ready exactly when Ready has been reported, and reported first.
        let ready_events = events
            .iter()
            .filter(|e| matches!(e, Event::Ready(_)))
            .count();
        assert_eq!(c.is_ready(), ready_events == 1);
        assert!(ready_events <= 1);
        if ready_events == 1 {
            assert!(matches!(events[0], Event::Ready(_)));
        }
        assert!(c.poll_timers(now).is_ok(), "no deadline has passed");
        output.extend(c.take_output());
    }
    if error.is_some() {
        // Failed for good: nothing more comes out, whatever is fed.
        assert!(!c.is_ready());
        assert_eq!(
            c.receive(b"weave\x01\x02\x00", now),
            Err(ConnectionError::Closed)
        );
        assert_eq!(c.poll_timers(now), Err(ConnectionError::Closed));
        assert_eq!(c.send(&Message::Heartbeat), Err(ConnectionError::Closed));
        assert_eq!(c.next_timer(), None);
        assert_eq!(c.poll_event(), None);
        assert!(c.take_output().is_empty());
    } else if c.is_ready() {
        assert!(c.send(&Message::Heartbeat).is_ok());
        assert!(!c.take_output().is_empty());
    } else {
        assert_eq!(c.send(&Message::Heartbeat), Err(ConnectionError::NotReady));
    }
    Outcome {
        ready: c.is_ready(),
        events,
        error,
        output,
    }
}

/// Runs `stream` through two fresh connections, whole and a byte at a time, and checks
/// that they agree. Returns the outcome.
pub fn check_chunking(password: bool, outbound: bool, stream: &[u8]) -> Outcome {
    let now = Instant::now();
    let mut whole = Connection::new(config(password, outbound), now);
    let a = run(&mut whole, &[stream], now);
    let mut bytewise = Connection::new(config(password, outbound), now);
    let chunks: Vec<&[u8]> = stream.chunks(1).collect();
    let b = run(&mut bytewise, &chunks, now);
    assert_eq!(a, b, "chunking changed the outcome");
    a
}
