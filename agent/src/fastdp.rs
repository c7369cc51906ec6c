//! The fast datapath's per-connection control protocol: Weave's VXLAN heartbeat,
//! which proves both liveness and the path MTU, and its acknowledgement over the
//! control connection.
//!
//! Wire facts (Weave Net 2.8.1, `router/fastdp.go`):
//! - The heartbeat is an inner Ethernet frame of exactly `14 + MTU` bytes: an all-zero
//!   Ethernet header, the connection's ConnUID (u64 BE) at offset 14, the frame's own
//!   length (u16 BE) at offset 22, zeros after. It is VXLAN-encapsulated like data
//!   (VNI `dst << 12 | src`) and sent with DF, so its arrival proves the path carries
//!   the overlay MTU.
//! - Its receiver checks the ConnUID and the embedded length, and acknowledges the
//!   first one over the control connection (overlay control sub-tag 0, empty).
//! - The sender sends every 500 ms until acknowledged, then every 10 s; a receiver
//!   that hears nothing for 60 s marks the fast path unhealthy (the connection then
//!   uses the sleeve) and healthy again on the next heartbeat.
//!
//! weft keeps that exchange, so a weaver's fast datapath works with weft's, and adds
//! two things between wefts: both announce (in the features, [`FEATURE`]) that they
//! send a heartbeat every [`WEFT_INTERVAL`], and then treat [`WEFT_TIMEOUT`] of
//! silence as unhealthy, so a blocked fast path moves to the sleeve in seconds rather
//! than Weave's minute; and each heartbeat says, in its padding ([`HEARS_OFFSET`],
//! which Weave leaves zero and ignores), whether its sender hears the receiver's
//! heartbeats, so a path blocked in one direction only is unhealthy at both ends
//! (else the end that still hears its peer would keep sending into the block).

use std::time::{Duration, Instant};

/// Overlay control sub-tag: heartbeat acknowledged (empty body).
pub const SUBTAG_HEARTBEAT_ACK: u8 = 0;
/// Overlay control sub-tag: IPsec SA set-up (64 bytes; not supported yet).
pub const SUBTAG_CRYPTO_INIT_SA_REMOTE: u8 = 1;
/// Offset of the ConnUID in a heartbeat frame.
const CONN_UID_OFFSET: usize = 14;
/// Offset of the embedded frame length.
const LEN_OFFSET: usize = 22;
/// Shortest valid heartbeat.
pub const MIN_HEARTBEAT_LEN: usize = 24;
/// Offset of weft's "I hear you" byte in the padding (1: the sender heard the
/// receiver's heartbeats within its timeout).
pub const HEARS_OFFSET: usize = 24;

/// Weave's heartbeat interval until acknowledged.
pub const FAST_HEARTBEAT: Duration = Duration::from_millis(500);
/// Weave's heartbeat interval after the acknowledgement.
pub const SLOW_HEARTBEAT: Duration = Duration::from_secs(10);
/// Weave's silence before the fast path counts as unhealthy.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);
/// The feature key a weft adds to its features: it sends a heartbeat every
/// [`WEFT_INTERVAL`] (Weave ignores features it does not know).
pub const FEATURE: &str = "WeftFastHeartbeat";
/// Heartbeat interval between wefts, after the acknowledgement too.
pub const WEFT_INTERVAL: Duration = Duration::from_millis(500);
/// Silence after which a weft peer's fast path counts as unhealthy.
pub const WEFT_TIMEOUT: Duration = Duration::from_millis(2500);

/// Builds the heartbeat frame for `conn_uid` on an overlay of `mtu` bytes; `hears`:
/// we hear the receiver's heartbeats (weft's padding byte; zero as Weave sends it).
pub fn heartbeat(conn_uid: u64, mtu: u16, hears: bool) -> Vec<u8> {
    let len = 14 + usize::from(mtu);
    let mut frame = vec![0u8; len.max(HEARS_OFFSET + 1)];
    frame[HEARS_OFFSET] = u8::from(hears);
    frame[CONN_UID_OFFSET..CONN_UID_OFFSET + 8].copy_from_slice(&conn_uid.to_be_bytes());
    let embedded = frame.len() as u16;
    frame[LEN_OFFSET..LEN_OFFSET + 2].copy_from_slice(&embedded.to_be_bytes());
    frame
}

/// Whether `frame` looks like a fast-datapath heartbeat (an all-zero Ethernet header)
/// and, if so, its ConnUID, provided its embedded length is its real length.
pub fn parse_heartbeat(frame: &[u8]) -> Option<u64> {
    if frame.len() < MIN_HEARTBEAT_LEN || frame[..14] != [0; 14] {
        return None;
    }
    let uid = u64::from_be_bytes(
        frame[CONN_UID_OFFSET..CONN_UID_OFFSET + 8]
            .try_into()
            .ok()?,
    );
    let embedded = u16::from_be_bytes([frame[LEN_OFFSET], frame[LEN_OFFSET + 1]]);
    (usize::from(embedded) == frame.len()).then_some(uid)
}

/// Whether a (valid) heartbeat says its sender hears us.
pub fn heartbeat_hears(frame: &[u8]) -> bool {
    frame.get(HEARS_OFFSET) == Some(&1)
}

/// What the owner of a [`FastdpForwarder`] must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FastdpAction {
    /// Send a heartbeat frame ([`heartbeat`]) to the peer through the fast path.
    SendHeartbeat,
    /// Send overlay control sub-tag [`SUBTAG_HEARTBEAT_ACK`] over the connection.
    SendAck,
}

/// What a control message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlOutcome {
    /// The peer acknowledged our heartbeats: our fast path reaches it.
    Acknowledged,
    /// A repeated acknowledgement.
    Repeated,
    /// The peer wants IPsec, which this fast path does not do (yet).
    Unsupported,
}

/// A control message this forwarder cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FastdpError {
    /// A sub-tag Weave does not define.
    #[error("unknown fastdp control message {0}")]
    UnknownSubtag(u8),
}

/// One connection's fast-datapath heartbeat state.
#[derive(Debug, Clone)]
pub struct FastdpForwarder {
    conn_uid: u64,
    mtu: u16,
    /// Heartbeat interval after the acknowledgement.
    slow: Duration,
    /// Silence after which the path is unhealthy.
    timeout: Duration,
    /// The peer is a weft: it says in its heartbeats whether it hears ours.
    weft_peer: bool,
    acked: bool,
    ack_sent: bool,
    last_heard: Option<Instant>,
    /// When the peer last said it hears our heartbeats.
    last_heard_by_peer: Option<Instant>,
    /// What the peer's latest heartbeat said: a "no" counts at once.
    peer_hears_us: bool,
    next_send: Instant,
}

impl FastdpForwarder {
    /// A forwarder for the connection `conn_uid`, sending its first heartbeat now.
    /// `weft_peer`: the remote announced [`FEATURE`], so the fast liveness applies.
    pub fn new(conn_uid: u64, mtu: u16, weft_peer: bool, now: Instant) -> Self {
        let (slow, timeout) = if weft_peer {
            (WEFT_INTERVAL, WEFT_TIMEOUT)
        } else {
            (SLOW_HEARTBEAT, HEARTBEAT_TIMEOUT)
        };
        Self {
            conn_uid,
            mtu,
            slow,
            timeout,
            weft_peer,
            acked: false,
            ack_sent: false,
            last_heard: None,
            last_heard_by_peer: None,
            peer_hears_us: false,
            next_send: now,
        }
    }

    /// The connection's ConnUID.
    pub fn conn_uid(&self) -> u64 {
        self.conn_uid
    }

    /// The overlay MTU the heartbeats prove.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether the peer acknowledged our heartbeats (Weave's "established").
    pub fn is_established(&self) -> bool {
        self.acked
    }

    /// Whether we hear the peer's heartbeats now (what our heartbeats tell it).
    pub fn hears_peer(&self, now: Instant) -> bool {
        self.last_heard
            .is_some_and(|t| now.saturating_duration_since(t) < self.timeout)
    }

    /// Whether the fast path may carry traffic now: established, the peer's
    /// heartbeats arrive, and (a weft peer) it says it hears ours: both directions
    /// work.
    pub fn is_healthy(&self, now: Instant) -> bool {
        let heard_by_peer = !self.weft_peer
            || (self.peer_hears_us
                && self
                    .last_heard_by_peer
                    .is_some_and(|t| now.saturating_duration_since(t) < self.timeout));
        self.acked && self.hears_peer(now) && heard_by_peer
    }

    /// A heartbeat frame arrived through the fast path (its ConnUID already matched
    /// this connection); `peer_hears_us`: its [`heartbeat_hears`] byte.
    pub fn on_heartbeat(&mut self, now: Instant, peer_hears_us: bool) -> Vec<FastdpAction> {
        self.last_heard = Some(now);
        self.peer_hears_us = peer_hears_us;
        if peer_hears_us {
            self.last_heard_by_peer = Some(now);
        }
        if self.ack_sent {
            return Vec::new();
        }
        self.ack_sent = true;
        vec![FastdpAction::SendAck]
    }

    /// An overlay control message for the fast path arrived.
    pub fn on_control(&mut self, subtag: u8, now: Instant) -> Result<ControlOutcome, FastdpError> {
        match subtag {
            SUBTAG_HEARTBEAT_ACK if self.acked => Ok(ControlOutcome::Repeated),
            SUBTAG_HEARTBEAT_ACK => {
                self.acked = true;
                self.next_send = now + self.slow;
                Ok(ControlOutcome::Acknowledged)
            }
            SUBTAG_CRYPTO_INIT_SA_REMOTE => Ok(ControlOutcome::Unsupported),
            other => Err(FastdpError::UnknownSubtag(other)),
        }
    }

    /// Heartbeats due at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<FastdpAction> {
        if now < self.next_send {
            return Vec::new();
        }
        let interval = if self.acked {
            self.slow
        } else {
            FAST_HEARTBEAT
        };
        self.next_send = now + interval;
        vec![FastdpAction::SendHeartbeat]
    }

    /// When [`FastdpForwarder::poll`] has something to do. (Health is a function of
    /// time: owners re-check it on their own tick.)
    pub fn next_deadline(&self) -> Instant {
        self.next_send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_frame_round_trips_and_checks_its_length() {
        let f = heartbeat(0xc350_c9d6_1fdf_9916, 1376, false);
        assert_eq!(f.len(), 1390);
        assert_eq!(&f[..14], &[0; 14]);
        assert_eq!(&f[14..22], &0xc350_c9d6_1fdf_9916u64.to_be_bytes());
        assert_eq!(&f[22..24], &1390u16.to_be_bytes());
        assert!(f[24..].iter().all(|&b| b == 0), "as Weave sends it");
        assert!(!heartbeat_hears(&f));
        let h = heartbeat(7, 1376, true);
        assert!(heartbeat_hears(&h));
        assert_eq!(parse_heartbeat(&h), Some(7));
        assert_eq!(parse_heartbeat(&f), Some(0xc350_c9d6_1fdf_9916));
        // Cut short by the path (a smaller MTU): the embedded length tells.
        assert_eq!(parse_heartbeat(&f[..1000]), None);
        assert_eq!(parse_heartbeat(&f[..23]), None);
        let mut not_special = f.clone();
        not_special[5] = 1;
        assert_eq!(parse_heartbeat(&not_special), None);
    }

    #[test]
    fn weave_schedule_until_and_after_the_ack() {
        let t0 = Instant::now();
        let mut fwd = FastdpForwarder::new(7, 1376, false, t0);
        assert_eq!(fwd.poll(t0), vec![FastdpAction::SendHeartbeat]);
        assert!(fwd.poll(t0 + Duration::from_millis(499)).is_empty());
        assert_eq!(
            fwd.poll(t0 + FAST_HEARTBEAT),
            vec![FastdpAction::SendHeartbeat]
        );
        assert!(!fwd.is_established());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(fwd.on_control(0, t1), Ok(ControlOutcome::Acknowledged));
        assert_eq!(fwd.on_control(0, t1), Ok(ControlOutcome::Repeated));
        assert!(fwd.is_established());
        assert!(fwd.poll(t1 + Duration::from_secs(9)).is_empty());
        assert_eq!(
            fwd.poll(t1 + SLOW_HEARTBEAT),
            vec![FastdpAction::SendHeartbeat]
        );
        assert_eq!(fwd.on_control(9, t1), Err(FastdpError::UnknownSubtag(9)));
        assert_eq!(fwd.on_control(1, t1), Ok(ControlOutcome::Unsupported));
    }

    #[test]
    fn ack_is_sent_once_and_health_follows_heartbeats() {
        let t0 = Instant::now();
        let mut fwd = FastdpForwarder::new(7, 1376, true, t0);
        assert_eq!(fwd.on_heartbeat(t0, true), vec![FastdpAction::SendAck]);
        assert!(fwd.on_heartbeat(t0, true).is_empty());
        // Heard from, but our own heartbeats not acknowledged: not usable.
        assert!(!fwd.is_healthy(t0));
        fwd.on_control(0, t0).unwrap();
        assert!(fwd.is_healthy(t0));
        assert!(fwd.is_healthy(t0 + WEFT_TIMEOUT - Duration::from_millis(1)));
        assert!(!fwd.is_healthy(t0 + WEFT_TIMEOUT));
        // Back as soon as a heartbeat arrives again; no second ack.
        let t1 = t0 + Duration::from_secs(30);
        assert!(fwd.on_heartbeat(t1, true).is_empty());
        assert!(fwd.is_healthy(t1));
        // Between wefts the interval stays short after the ack.
        assert_eq!(fwd.poll(t1), vec![FastdpAction::SendHeartbeat]);
        assert!(
            fwd.poll(t1 + WEFT_INTERVAL - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(
            fwd.poll(t1 + WEFT_INTERVAL),
            vec![FastdpAction::SendHeartbeat]
        );
    }

    #[test]
    fn a_weft_peer_that_does_not_hear_us_makes_the_path_unhealthy() {
        let t0 = Instant::now();
        let mut fwd = FastdpForwarder::new(7, 1376, true, t0);
        fwd.on_control(0, t0).unwrap();
        // We hear it, it does not hear us (blocked towards it): unhealthy.
        fwd.on_heartbeat(t0, false);
        assert!(fwd.hears_peer(t0));
        assert!(!fwd.is_healthy(t0));
        fwd.on_heartbeat(t0, true);
        assert!(fwd.is_healthy(t0));
        // It says it stopped hearing us: unhealthy at once.
        let t1 = t0 + Duration::from_millis(500);
        fwd.on_heartbeat(t1, false);
        assert!(!fwd.is_healthy(t1));
        fwd.on_heartbeat(t1, true);
        assert!(fwd.is_healthy(t1));
        // A Weave peer never says; its heartbeats alone count.
        let mut weave = FastdpForwarder::new(7, 1376, false, t0);
        weave.on_control(0, t0).unwrap();
        weave.on_heartbeat(t0, false);
        assert!(weave.is_healthy(t0));
    }

    #[test]
    fn weave_peer_gets_weaves_timeout() {
        let t0 = Instant::now();
        let mut fwd = FastdpForwarder::new(7, 1376, false, t0);
        fwd.on_heartbeat(t0, true);
        fwd.on_control(0, t0).unwrap();
        assert!(fwd.is_healthy(t0 + Duration::from_secs(59)));
        assert!(!fwd.is_healthy(t0 + HEARTBEAT_TIMEOUT));
    }

    #[test]
    fn deadline_is_the_next_heartbeat() {
        let t0 = Instant::now();
        let mut fwd = FastdpForwarder::new(7, 1376, true, t0);
        assert_eq!(fwd.next_deadline(), t0);
        fwd.poll(t0);
        assert_eq!(fwd.next_deadline(), t0 + FAST_HEARTBEAT);
    }
}
