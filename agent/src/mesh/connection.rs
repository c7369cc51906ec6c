//! One mesh TCP connection's protocol state machine, free of I/O.
//!
//! The caller owns the socket: it writes what [`Connection::take_output`] returns, feeds
//! what it reads to [`Connection::receive`] (in any chunking), calls
//! [`Connection::poll_timers`] at [`Connection::next_timer`], and takes
//! [`Event`]s: first [`Event::Ready`] with the remote's features once the handshake is
//! done, then every [`Message`] the remote sends. Any error ends the connection; the
//! caller closes the socket.
//!
//! Sequence (version 2, both sides at once): header `weave 1 2`; encryption byte (`00`,
//! or `01` + a fresh public key); then `[u32 BE length][body]` messages, the first one
//! each way being the features map, each body sealed with the session key in password
//! mode.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use thiserror::Error;

use super::{
    PeerName, SessionKey, ShortId,
    crypto::{DecryptError, KeyPair, Password, TcpOpener, TcpSealer},
    wire::{self, Features, HEADER_LEN, MAX_TCP_MSG_SIZE, Message, PUBLIC_KEY_LEN, WireError},
};

/// Deadline for the protocol header exchange.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Read deadline after the header, renewed by every message received.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of the TCP heartbeat (tag 0) once the connection is ready.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Largest features message accepted (Weave's are under 200 bytes).
pub const MAX_FEATURES_SIZE: usize = 64 * 1024;

/// Who we are, as the features tell the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    /// Our peer name.
    pub name: PeerName,
    /// Our nickname.
    pub nickname: String,
    /// Our incarnation UID (random, non-zero, fixed for the process).
    pub uid: u64,
    /// Our ShortID, if we have one.
    pub short_id: Option<ShortId>,
}

/// What a new connection needs. The caller supplies the randomness. `Debug` leaves the
/// key material out.
#[derive(Clone)]
pub struct ConnectionConfig {
    /// Our identity.
    pub identity: LocalIdentity,
    /// The mesh password; `None` for plain mode.
    pub password: Option<Password>,
    /// Our overlays, space-separated, in our order (`"fastdp sleeve"`, `"sleeve"`);
    /// `None` leaves the `Overlays` feature out (Weave's compat mode).
    pub overlays: Option<String>,
    /// Whether we trust the remote (its address is in our trusted subnets).
    pub trusted: bool,
    /// Whether we announce weft's fast heartbeat ([`Features::fast_heartbeat`]).
    pub fast_heartbeat: bool,
    /// Whether we dialled.
    pub outbound: bool,
    /// A fresh random id for this connection.
    pub conn_id: u64,
    /// 32 fresh random bytes, the secret of this connection's ephemeral key pair
    /// (used only with a password).
    pub key_random: [u8; 32],
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("identity", &self.identity)
            .field("password", &self.password)
            .field("overlays", &self.overlays)
            .field("trusted", &self.trusted)
            .field("outbound", &self.outbound)
            .field("conn_id", &self.conn_id)
            .finish_non_exhaustive()
    }
}

/// What the handshake learnt about the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteIntro {
    /// The remote's features.
    pub features: Features,
    /// ConnUID: our ConnID XOR theirs, the same at both ends.
    pub conn_uid: u64,
    /// The session key (password mode only).
    pub session_key: Option<SessionKey>,
    /// The protocol version in use (2).
    pub protocol_version: u8,
}

/// What the connection reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake is complete; messages may be sent.
    Ready(RemoteIntro),
    /// A message from the remote (blank messages and unknown tags are left out).
    Message(Message),
}

/// Why a connection ended. Texts are Weave's where it has one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnectionError {
    /// A protocol error in the header, the features or a message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// We have a password, the remote sent `00`.
    #[error("password specified, but peer requested an unencrypted connection")]
    PeerUnencrypted,
    /// We have no password, the remote sent `01`.
    #[error("no password specificed, but peer requested an encrypted connection")]
    PeerEncrypted,
    /// A message that does not open with the session key (wrong password).
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    /// A length prefix above 10 MiB.
    #[error("incoming message exceeds maximum size: {0} > {MAX_TCP_MSG_SIZE}")]
    IncomingTooLarge(u32),
    /// A message to send above 10 MiB.
    #[error("outgoing message exceeds maximum size: {0} > {MAX_TCP_MSG_SIZE}")]
    OutgoingTooLarge(usize),
    /// No complete protocol header within 10 s.
    #[error("failed to receive remote protocol header: i/o timeout")]
    HeaderTimeout,
    /// Nothing received for 60 s.
    #[error("read: i/o timeout")]
    ReadTimeout,
    /// `send` before [`Event::Ready`].
    #[error("connection is not ready: the handshake is not complete")]
    NotReady,
    /// The connection already failed.
    #[error("connection already shut down")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    EncryptionFlag,
    PublicKey,
    Features,
    Ready,
    Failed,
}

/// One mesh TCP connection, sans I/O.
#[derive(Debug)]
pub struct Connection {
    config: ConnectionConfig,
    phase: Phase,
    keypair: Option<KeyPair>,
    session_key: Option<SessionKey>,
    sealer: Option<TcpSealer>,
    opener: Option<TcpOpener>,
    version: u8,
    input: Vec<u8>,
    output: Vec<u8>,
    events: VecDeque<Event>,
    header_deadline: Instant,
    read_deadline: Instant,
    next_heartbeat: Option<Instant>,
}

impl Connection {
    /// A connection that has just been dialled or accepted at `now`; the header and the
    /// encryption byte (+ public key) are queued for sending at once.
    pub fn new(config: ConnectionConfig, now: Instant) -> Self {
        let keypair = config
            .password
            .as_ref()
            .map(|_| KeyPair::from_random(config.key_random));
        let mut output = wire::protocol_header().to_vec();
        let public = keypair.as_ref().map(KeyPair::public_key);
        output.extend(wire::encryption_announcement(public.as_ref()));
        Connection {
            config,
            phase: Phase::Header,
            keypair,
            session_key: None,
            sealer: None,
            opener: None,
            version: 0,
            input: Vec::new(),
            output,
            events: VecDeque::new(),
            header_deadline: now + HEADER_TIMEOUT,
            read_deadline: now + HEADER_TIMEOUT,
            next_heartbeat: None,
        }
    }

    /// Whether we dialled.
    pub fn outbound(&self) -> bool {
        self.config.outbound
    }

    /// Whether the handshake is complete (and the connection has not failed).
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The features we send.
    pub fn local_features(&self) -> Features {
        let id = &self.config.identity;
        Features {
            name: id.name,
            nickname: id.nickname.clone(),
            uid: id.uid,
            conn_id: self.config.conn_id,
            short_id: id.short_id,
            trusted: self.config.trusted,
            overlays: self
                .config
                .overlays
                .as_ref()
                .map(|o| o.split_whitespace().map(str::to_owned).collect()),
            fast_heartbeat: self.config.fast_heartbeat,
        }
    }

    /// Bytes to write to the socket, in order (empties the queue).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Feeds bytes read from the socket at `now`. An error ends the connection.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) -> Result<(), ConnectionError> {
        if self.phase == Phase::Failed {
            return Err(ConnectionError::Closed);
        }
        self.input.extend_from_slice(bytes);
        let mut pos = 0;
        let res = self.process(&mut pos, now);
        self.input.drain(..pos);
        res.inspect_err(|_| self.fail())
    }

    fn fail(&mut self) {
        self.phase = Phase::Failed;
        self.input = Vec::new();
        self.sealer = None;
        self.opener = None;
        self.next_heartbeat = None;
    }

    fn process(&mut self, pos: &mut usize, now: Instant) -> Result<(), ConnectionError> {
        loop {
            let avail = &self.input[*pos..];
            match self.phase {
                Phase::Header => {
                    let Some(h) = avail.first_chunk::<HEADER_LEN>() else {
                        return Ok(());
                    };
                    self.version = wire::negotiate_version(h)?;
                    *pos += HEADER_LEN;
                    self.read_deadline = now + READ_TIMEOUT;
                    self.phase = Phase::EncryptionFlag;
                }
                Phase::EncryptionFlag => {
                    let Some(&flag) = avail.first() else {
                        return Ok(());
                    };
                    match (flag, self.keypair.is_some()) {
                        (0, true) => return Err(ConnectionError::PeerUnencrypted),
                        (1, false) => return Err(ConnectionError::PeerEncrypted),
                        (0, false) => {
                            *pos += 1;
                            self.queue_features()?;
                            self.phase = Phase::Features;
                        }
                        (1, true) => {
                            *pos += 1;
                            self.phase = Phase::PublicKey;
                        }
                        (other, _) => return Err(WireError::BadEncryptionFlag(other).into()),
                    }
                }
                Phase::PublicKey => {
                    let Some(remote) = avail.first_chunk::<PUBLIC_KEY_LEN>() else {
                        return Ok(());
                    };
                    let (Some(kp), Some(pw)) = (&self.keypair, &self.config.password) else {
                        return Err(ConnectionError::PeerEncrypted);
                    };
                    let key = kp.session_key(remote, pw);
                    *pos += PUBLIC_KEY_LEN;
                    self.sealer = Some(TcpSealer::new(&key, self.config.outbound));
                    self.opener = Some(TcpOpener::new(&key, !self.config.outbound));
                    self.session_key = Some(key);
                    // Only our own key pair's secret was needed; drop it.
                    self.keypair = None;
                    self.queue_features()?;
                    self.phase = Phase::Features;
                }
                Phase::Features | Phase::Ready => {
                    let Some(len) = avail.first_chunk::<4>() else {
                        return Ok(());
                    };
                    let len = u32::from_be_bytes(*len);
                    // Before the handshake completes only the features may come: a
                    // few hundred bytes, so an unauthenticated peer gets no more.
                    let limit = if self.phase == Phase::Features {
                        MAX_FEATURES_SIZE
                    } else {
                        MAX_TCP_MSG_SIZE
                    };
                    if len as usize > limit {
                        return Err(ConnectionError::IncomingTooLarge(len));
                    }
                    let Some(body) = avail.get(4..4 + len as usize) else {
                        return Ok(());
                    };
                    let plain = match &mut self.opener {
                        Some(o) => o.open(body)?,
                        None => body.to_vec(),
                    };
                    *pos += 4 + len as usize;
                    self.read_deadline = now + READ_TIMEOUT;
                    self.handle_message(&plain, now)?;
                }
                Phase::Failed => return Err(ConnectionError::Closed),
            }
        }
    }

    fn handle_message(&mut self, plain: &[u8], now: Instant) -> Result<(), ConnectionError> {
        if self.phase == Phase::Features {
            let features = Features::decode(plain)?;
            let conn_uid = self.config.conn_id ^ features.conn_id;
            self.events.push_back(Event::Ready(RemoteIntro {
                features,
                conn_uid,
                session_key: self.session_key.clone(),
                protocol_version: self.version,
            }));
            self.phase = Phase::Ready;
            self.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
            return Ok(());
        }
        if let Some(msg) = Message::decode(plain)? {
            self.events.push_back(Event::Message(msg));
        }
        Ok(())
    }

    fn queue_features(&mut self) -> Result<(), ConnectionError> {
        let body = self.local_features().encode();
        self.queue_frame(&body)
    }

    fn queue_frame(&mut self, plain: &[u8]) -> Result<(), ConnectionError> {
        let body = match &mut self.sealer {
            Some(s) => s.seal(plain),
            None => plain.to_vec(),
        };
        if body.len() > MAX_TCP_MSG_SIZE {
            return Err(ConnectionError::OutgoingTooLarge(body.len()));
        }
        self.output
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.output.extend_from_slice(&body);
        Ok(())
    }

    /// Queues `msg` for the remote (framed, sealed in password mode). Only after
    /// [`Event::Ready`]. A message over 10 MiB is refused (and the connection stays up).
    pub fn send(&mut self, msg: &Message) -> Result<(), ConnectionError> {
        match self.phase {
            Phase::Ready => {}
            Phase::Failed => return Err(ConnectionError::Closed),
            _ => return Err(ConnectionError::NotReady),
        }
        let plain = msg.encode();
        // Checked before sealing, so a refused message does not use up a nonce.
        let sealed_len = plain.len() + self.sealer.as_ref().map_or(0, |_| 16);
        if sealed_len > MAX_TCP_MSG_SIZE {
            return Err(ConnectionError::OutgoingTooLarge(sealed_len));
        }
        self.queue_frame(&plain)
    }

    /// When [`Connection::poll_timers`] next has something to do.
    pub fn next_timer(&self) -> Option<Instant> {
        match self.phase {
            Phase::Failed => None,
            Phase::Header => Some(self.header_deadline),
            _ => Some(match self.next_heartbeat {
                Some(h) => h.min(self.read_deadline),
                None => self.read_deadline,
            }),
        }
    }

    /// Enforces the deadlines (10 s for the header, 60 s between messages) and queues a
    /// heartbeat every 30 s once ready.
    pub fn poll_timers(&mut self, now: Instant) -> Result<(), ConnectionError> {
        let res = match self.phase {
            Phase::Failed => return Err(ConnectionError::Closed),
            Phase::Header if now >= self.header_deadline => Err(ConnectionError::HeaderTimeout),
            Phase::Header => Ok(()),
            _ if now >= self.read_deadline => Err(ConnectionError::ReadTimeout),
            _ => {
                if let Some(at) = self.next_heartbeat
                    && now >= at
                {
                    self.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
                    self.queue_frame(&Message::Heartbeat.encode())?;
                }
                Ok(())
            }
        };
        res.inspect_err(|_| self.fail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(n: u8, password: Option<&str>, outbound: bool) -> ConnectionConfig {
        ConnectionConfig {
            identity: LocalIdentity {
                name: PeerName([0xaa, 0, 0, 0, 0, n]),
                nickname: format!("h{n}"),
                uid: 1000 + u64::from(n),
                short_id: Some(u16::from(n) * 100),
            },
            password: password.map(Password::new),
            overlays: Some("sleeve".into()),
            trusted: false,
            fast_heartbeat: false,
            outbound,
            conn_id: 0x1111_0000 * u64::from(n) + 7,
            key_random: [n; 32],
        }
    }

    /// Moves bytes both ways until neither side has anything to say; returns the
    /// first error of each side.
    fn pump(
        a: &mut Connection,
        b: &mut Connection,
        now: Instant,
        chunk: usize,
    ) -> (Option<ConnectionError>, Option<ConnectionError>) {
        let (mut ea, mut eb) = (None, None);
        loop {
            let oa = a.take_output();
            let ob = b.take_output();
            if oa.is_empty() && ob.is_empty() {
                return (ea, eb);
            }
            if eb.is_none() {
                for c in oa.chunks(chunk) {
                    if let Err(e) = b.receive(c, now) {
                        eb = Some(e);
                        break;
                    }
                }
            }
            if ea.is_none() {
                for c in ob.chunks(chunk) {
                    if let Err(e) = a.receive(c, now) {
                        ea = Some(e);
                        break;
                    }
                }
            }
        }
    }

    fn ready(c: &mut Connection) -> RemoteIntro {
        match c.poll_event() {
            Some(Event::Ready(i)) => i,
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn handshake(password: (Option<&str>, Option<&str>), chunk: usize) {
        let now = Instant::now();
        let mut a = Connection::new(config(1, password.0, true), now);
        let mut b = Connection::new(config(2, password.1, false), now);
        assert_eq!(pump(&mut a, &mut b, now, chunk), (None, None));
        let ia = ready(&mut a);
        let ib = ready(&mut b);
        assert_eq!(ia.conn_uid, ib.conn_uid);
        assert_eq!(
            ia.conn_uid,
            config(1, None, true).conn_id ^ config(2, None, false).conn_id
        );
        assert_eq!(ia.features, b.local_features());
        assert_eq!(ib.features, a.local_features());
        assert_eq!(ia.protocol_version, 2);
        assert_eq!(ia.session_key, ib.session_key);
        assert_eq!(ia.session_key.is_some(), password.0.is_some());
        assert!(a.is_ready() && b.is_ready());

        let gossip = Message::Gossip {
            channel: "topology".into(),
            source: PeerName([0xaa, 0, 0, 0, 0, 1]),
            payload: vec![1, 2, 3],
        };
        let ctl = Message::OverlayControl {
            index: 0,
            subtag: 3,
            body: vec![5, 0x9e],
        };
        for _ in 0..3 {
            a.send(&gossip).unwrap();
            b.send(&ctl).unwrap();
            b.send(&Message::Heartbeat).unwrap();
        }
        assert_eq!(pump(&mut a, &mut b, now, chunk), (None, None));
        for _ in 0..3 {
            assert_eq!(b.poll_event(), Some(Event::Message(gossip.clone())));
            assert_eq!(a.poll_event(), Some(Event::Message(ctl.clone())));
            assert_eq!(a.poll_event(), Some(Event::Message(Message::Heartbeat)));
        }
        assert_eq!(a.poll_event(), None);
        assert_eq!(b.poll_event(), None);
    }

    #[test]
    fn plain_handshake_and_messages() {
        handshake((None, None), usize::MAX);
    }

    #[test]
    fn password_handshake_and_messages() {
        handshake((Some("secret"), Some("secret")), usize::MAX);
    }

    #[test]
    fn byte_at_a_time() {
        handshake((None, None), 1);
        handshake((Some("secret"), Some("secret")), 1);
    }

    #[test]
    fn first_bytes_are_header_and_key() {
        let now = Instant::now();
        let mut a = Connection::new(config(1, None, true), now);
        assert_eq!(a.take_output(), b"weave\x01\x02\x00");
        let mut b = Connection::new(config(1, Some("x"), true), now);
        let out = b.take_output();
        assert_eq!(out.len(), 7 + 33);
        assert_eq!(out[7], 1);
        assert_eq!(out[8..], KeyPair::from_random([1; 32]).public_key());
        // Nothing more until the remote's header and key arrived.
        b.receive(b"weave\x01\x02\x01", now).unwrap();
        assert!(b.take_output().is_empty());
        b.receive(&[9; 32], now).unwrap();
        let features = b.take_output();
        let len = u32::from_be_bytes(features[..4].try_into().unwrap()) as usize;
        assert_eq!(features.len(), 4 + len);
        assert_eq!(len, b.local_features().encode().len() + 16);
    }

    #[test]
    fn wrong_password_fails_with_decrypt_error_both_ways() {
        let now = Instant::now();
        let mut a = Connection::new(config(1, Some("secret"), true), now);
        let mut b = Connection::new(config(2, Some("Secret"), false), now);
        let (ea, eb) = pump(&mut a, &mut b, now, usize::MAX);
        for e in [ea.unwrap(), eb.unwrap()] {
            assert_eq!(e.to_string(), "Unable to decrypt TCP msg");
        }
        assert_eq!(a.poll_event(), None);
        assert_eq!(a.receive(b"x", now), Err(ConnectionError::Closed));
        assert_eq!(a.send(&Message::Heartbeat), Err(ConnectionError::Closed));
    }

    #[test]
    fn mismatched_password_mode_gives_weaves_errors() {
        let now = Instant::now();
        let mut a = Connection::new(config(1, Some("secret"), true), now);
        let mut b = Connection::new(config(2, None, false), now);
        let (ea, eb) = pump(&mut a, &mut b, now, usize::MAX);
        assert_eq!(
            ea.unwrap().to_string(),
            "password specified, but peer requested an unencrypted connection"
        );
        assert_eq!(
            eb.unwrap().to_string(),
            "no password specificed, but peer requested an encrypted connection"
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let now = Instant::now();
        let e = |bytes: &[u8], password: Option<&str>| {
            let mut c = Connection::new(config(1, password, false), now);
            c.receive(bytes, now).unwrap_err()
        };
        assert_eq!(
            e(b"GET / HTTP/1.1\r\n", None).to_string(),
            "remote protocol header not recognised: [71 69 84 32 47]"
        );
        assert_eq!(
            e(b"weave\x03\x03", None).to_string(),
            "remote version range [3,3] is incompatible with ours [1,2]"
        );
        assert_eq!(
            e(b"weave\x01\x02\x07", None).to_string(),
            "Bad encryption flag 7"
        );
        assert_eq!(
            e(b"weave\x01\x02\x00\x00\xa0\x00\x01", None).to_string(),
            "incoming message exceeds maximum size: 10485761 > 10485760"
        );
        // Features that are not gob.
        assert!(matches!(
            e(b"weave\x01\x02\x00\x00\x00\x00\x03abc", None),
            ConnectionError::Wire(WireError::Gob(_))
        ));
        // A blank first message is not a features map.
        assert!(matches!(
            e(b"weave\x01\x02\x00\x00\x00\x00\x00", None),
            ConnectionError::Wire(_)
        ));
        // Encrypted garbage.
        let mut g = b"weave\x01\x02\x01".to_vec();
        g.extend([3; 32]);
        g.extend([0, 0, 0, 20]);
        g.extend([0x55; 20]);
        assert_eq!(e(&g, Some("pw")), ConnectionError::Decrypt(DecryptError));
        // Pseudo-random garbage after a valid header never panics.
        let mut x: u32 = 12345;
        for round in 0..200 {
            let mut c = Connection::new(config(1, None, false), now);
            let mut buf = b"weave\x01\x02\x00".to_vec();
            for _ in 0..(round * 7 % 300) {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                buf.push((x >> 16) as u8);
            }
            let _ = c.receive(&buf, now);
        }
    }

    #[test]
    fn messages_after_ready_blank_unknown_and_short() {
        let now = Instant::now();
        let mut a = Connection::new(config(1, None, true), now);
        let mut b = Connection::new(config(2, None, false), now);
        pump(&mut a, &mut b, now, usize::MAX);
        ready(&mut b);
        // Blank message and unknown tag: ignored.
        b.receive(&[0, 0, 0, 0, 0, 0, 0, 2, 9, 9], now).unwrap();
        assert_eq!(b.poll_event(), None);
        // Tag 7 shorter than 2 bytes: an error.
        assert_eq!(
            b.receive(&[0, 0, 0, 2, 7, 0], now),
            Err(ConnectionError::Wire(WireError::ShortOverlayControl(1)))
        );
        assert!(!b.is_ready());
    }

    #[test]
    fn debug_hides_secrets() {
        let now = Instant::now();
        let mut cfg = config(1, Some("hunter2"), true);
        cfg.key_random = [0xab; 32];
        let mut a = Connection::new(cfg, now);
        let mut b = Connection::new(config(2, Some("hunter2"), false), now);
        pump(&mut a, &mut b, now, usize::MAX);
        let i = ready(&mut a);
        let text = format!("{a:?} {i:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("171"), "{text}");
        // The key in any form Debug could print it: its bytes as a list (the first 12,
        // enough not to match by chance), or as hex.
        let key = i.session_key.unwrap().0;
        let list = format!("{:?}", &key[..12]);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&list[1..list.len() - 1]), "{text}");
        assert!(!text.contains(&hex[..16]), "{text}");
    }

    #[test]
    fn timers() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        // Header deadline.
        let mut c = Connection::new(config(1, None, true), t0);
        assert_eq!(c.next_timer(), Some(t0 + 10 * s));
        c.poll_timers(t0 + 9 * s).unwrap();
        assert_eq!(
            c.poll_timers(t0 + 10 * s),
            Err(ConnectionError::HeaderTimeout)
        );
        assert_eq!(c.next_timer(), None);

        // Read deadline, renewed by messages; heartbeats every 30 s.
        let mut a = Connection::new(config(1, Some("pw"), true), t0);
        let mut b = Connection::new(config(2, Some("pw"), false), t0);
        pump(&mut a, &mut b, t0, usize::MAX);
        ready(&mut a);
        ready(&mut b);
        assert_eq!(a.next_timer(), Some(t0 + 30 * s));
        a.poll_timers(t0 + 29 * s).unwrap();
        assert!(a.take_output().is_empty());
        a.poll_timers(t0 + 30 * s).unwrap();
        let hb = a.take_output();
        assert_eq!(hb.len(), 4 + 17);
        assert_eq!(hb[..4], [0, 0, 0, 17]);
        b.receive(&hb, t0 + 30 * s).unwrap();
        assert_eq!(b.poll_event(), Some(Event::Message(Message::Heartbeat)));
        // b heard something at 30 s: its deadline is now 90 s.
        b.poll_timers(t0 + 60 * s).unwrap();
        b.take_output();
        b.poll_timers(t0 + 89 * s).unwrap();
        assert_eq!(
            b.poll_timers(t0 + 90 * s),
            Err(ConnectionError::ReadTimeout)
        );
        // a heard nothing since the handshake at 0 s.
        assert_eq!(
            a.poll_timers(t0 + 60 * s),
            Err(ConnectionError::ReadTimeout)
        );
    }

    #[test]
    fn send_before_ready_and_oversize() {
        let now = Instant::now();
        let mut a = Connection::new(config(1, None, true), now);
        assert_eq!(a.send(&Message::Heartbeat), Err(ConnectionError::NotReady));
        let mut b = Connection::new(config(2, None, false), now);
        pump(&mut a, &mut b, now, usize::MAX);
        let big = Message::CompatSleeve {
            tag: 1,
            body: vec![0; MAX_TCP_MSG_SIZE],
        };
        assert_eq!(
            a.send(&big),
            Err(ConnectionError::OutgoingTooLarge(MAX_TCP_MSG_SIZE + 1))
        );
        assert!(a.is_ready());
    }
}
