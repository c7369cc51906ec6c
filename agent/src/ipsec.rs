//! IPsec for the encrypted fast datapath: Weave Net's key exchange over the control
//! connection, as a sans-IO state machine.
//!
//! On a connection with a password, Weave Net 2.8.1 protects the fast datapath's
//! VXLAN traffic with kernel ESP (transport mode, `rfc4106(gcm(aes))`). Each
//! direction has its own security association (SA), set up by the direction's
//! *receiver*:
//!
//! 1. The receiver asks the kernel for an inbound SPI (XFRM `allocspi`, source = the
//!    remote address, destination = the local one), draws a 32-byte random nonce,
//!    derives the SA key ([`derive_key`] with its *own* peer name), installs the
//!    inbound SA, and only then sends nonce and SPI ([`SaInit`]) to the sender over
//!    the encrypted control connection (fast datapath overlay control sub-tag
//!    [`SUBTAG_CRYPTO_INIT_SA_REMOTE`]).
//! 2. The sender derives the same key (with the *receiver's* peer name) and installs
//!    the outbound SA and the outbound policy that steers the marked VXLAN packets
//!    into it.
//!
//! Both ends start their receiving half when the connection is confirmed, so each
//! sends one [`SaInit`] and receives one. A weaver sends no fast-datapath heartbeat
//! until its outbound SA exists (it waits for our [`SaInit`]); weft should do the
//! same (send heartbeats once [`IpsecSession::outbound_spi`] is `Some`).
//!
//! [`IpsecSession`] is one connection's half of that exchange. It does no I/O: it
//! returns [`IpsecAction`]s (allocate an SPI, install or delete an SA, send a
//! message) that the caller performs, in order, and tells the session about with
//! [`IpsecSession::on_spi_allocated`] and friends. Time and randomness come from the
//! caller.
//!
//! # Wire format of `CryptoInitSARemote` (64 bytes)
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                     nonce (32 bytes, random)                  +   bytes 0..32
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                     SPI (u32, big-endian)                     |   bytes 32..36
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                                                               |
//! +                     zero (28 bytes, ignored)                  +   bytes 36..64
//! |                                                               |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! It travels as the body of a fast datapath overlay control message, after the
//! sub-tag byte. Any other length is an error (Weave: `invalid payload size: N`,
//! `empty msg` for none). The SPI is the receiver's inbound SPI; the 28 trailing
//! bytes are zero when sent and ignored when received, as Weave does.
//!
//! # Key
//!
//! `HKDF-SHA256(ikm = the connection's 32-byte session key, salt = nonce,
//! info = the receiving peer's name as a big-endian u64)`, 36 bytes: the AES-256 key
//! and the 4-byte salt of `rfc4106(gcm(aes))` (the kernel's 288-bit key).
//!
//! # Rekeying (weft to weft only)
//!
//! With `rekey_every`, the receiver repeats step 1 periodically. The sender cannot
//! acknowledge (Weave's protocol has no reply), so the receiver keeps the old inbound
//! SA for [`INBOUND_GRACE`], much longer than the message takes to arrive and the
//! sender to switch:
//!
//! ```text
//!  receiver (inbound)                           sender (outbound)
//!  t0  AllocInbound -> on_spi_allocated(new)
//!      InstallInbound{new}     (old and new inbound SAs both accept)
//!      SendInit{nonce', new}  ------------->   on_sa_init
//!                                              InstallOutbound{new}: new SA, then the
//!                                                policy switches to it (one UPDPOLICY)
//!                                              t1 + OUTBOUND_GRACE: DeleteOutbound{old}
//!  t0 + INBOUND_GRACE: DeleteInbound{old}
//! ```
//!
//! A weaver accepts a repeated `CryptoInitSARemote` (it adds the new outbound SA and
//! switches its policy) but never deletes the SA it replaced until it shuts down,
//! so rekeying against a weaver would leak one SA per rekey in its kernel: pass
//! `rekey_every = None` for a weaver peer.

use std::time::{Duration, Instant};

use hkdf::Hkdf;
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroize;

pub use crate::fastdp::SUBTAG_CRYPTO_INIT_SA_REMOTE;
use crate::mesh::{PeerName, SessionKey};

/// Length of a `CryptoInitSARemote` body.
pub const SA_INIT_LEN: usize = 64;
/// Length of the HKDF nonce (salt) in a `CryptoInitSARemote`.
pub const NONCE_LEN: usize = 32;
/// Length of an SA key: AES-256 key (32) + GCM salt (4), 288 bits.
pub const SA_KEY_LEN: usize = 36;
/// How long a receiver keeps an inbound SA after it sent the SPI that replaces it.
/// It must cover the message's trip and the sender's switch, with a wide margin.
pub const INBOUND_GRACE: Duration = Duration::from_secs(30);
/// How long a sender keeps an outbound SA after its policy moved to a new one (for
/// packets the kernel is transforming at the moment of the switch).
pub const OUTBOUND_GRACE: Duration = Duration::from_secs(5);
/// First retry delay after a failed SPI allocation or inbound install; it doubles up
/// to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Byte ranges of the `CryptoInitSARemote` body.
mod field {
    use std::ops::Range;

    pub const NONCE: Range<usize> = 0..32;
    pub const SPI: Range<usize> = 32..36;
}

/// A bad `CryptoInitSARemote`. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IpsecError {
    /// The body was empty (Weave: `empty msg`).
    #[error("CryptoInitSARemote: empty msg")]
    Empty,
    /// The body was not [`SA_INIT_LEN`] bytes long.
    #[error("CryptoInitSARemote: invalid payload size: {0} (expected {SA_INIT_LEN})")]
    InvalidPayloadSize(usize),
    /// The SPI was 0, which no kernel allocates.
    #[error("CryptoInitSARemote: invalid SPI 0")]
    InvalidSpi,
}

/// A `CryptoInitSARemote` body: the receiver's nonce and inbound SPI.
#[derive(Clone, PartialEq, Eq)]
pub struct SaInit {
    /// HKDF salt, 32 random bytes.
    pub nonce: [u8; NONCE_LEN],
    /// The receiver's inbound SPI (the sender's outbound SPI).
    pub spi: u32,
}

impl std::fmt::Debug for SaInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaInit")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .finish_non_exhaustive()
    }
}

impl SaInit {
    /// The 64-byte wire form: nonce, SPI (big-endian), 28 zero bytes.
    pub fn encode(&self) -> [u8; SA_INIT_LEN] {
        let mut b = [0u8; SA_INIT_LEN];
        b[field::NONCE].copy_from_slice(&self.nonce);
        b[field::SPI].copy_from_slice(&self.spi.to_be_bytes());
        b
    }

    /// Parses a body; it must be exactly [`SA_INIT_LEN`] bytes. The trailing zero
    /// bytes are not checked (Weave ignores them too).
    pub fn decode(body: &[u8]) -> Result<Self, IpsecError> {
        if body.is_empty() {
            return Err(IpsecError::Empty);
        }
        let body: &[u8; SA_INIT_LEN] = body
            .try_into()
            .map_err(|_| IpsecError::InvalidPayloadSize(body.len()))?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&body[field::NONCE]);
        let mut spi = [0u8; 4];
        spi.copy_from_slice(&body[field::SPI]);
        Ok(SaInit {
            nonce,
            spi: u32::from_be_bytes(spi),
        })
    }
}

/// An SA key: the AES-256 key followed by the 4-byte GCM salt, as the kernel's
/// `rfc4106(gcm(aes))` takes it (288 bits). Zeroed when dropped; `Debug` never shows
/// it.
pub struct SaKey([u8; SA_KEY_LEN]);

impl SaKey {
    /// A key from its 36 bytes (a probe's or a test's; real keys come from
    /// [`derive_key`]).
    pub fn from_bytes(bytes: [u8; SA_KEY_LEN]) -> Self {
        SaKey(bytes)
    }

    /// The 36 key bytes (for the XFRM request only).
    pub fn as_bytes(&self) -> &[u8; SA_KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for SaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaKey(..)")
    }
}

impl Drop for SaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Weave's SA key derivation: HKDF-SHA256 with the session key as input key
/// material, the nonce as salt and the receiving peer's name (big-endian u64) as
/// info, expanded to [`SA_KEY_LEN`] bytes.
pub fn derive_key(session_key: &SessionKey, nonce: &[u8; NONCE_LEN], receiver: PeerName) -> SaKey {
    let hk = Hkdf::<Sha256>::new(Some(nonce), &session_key.0);
    let mut key = SaKey([0; SA_KEY_LEN]);
    // HKDF-SHA256 can expand to 255 * 32 bytes; 36 always fits.
    if hk
        .expand(&receiver.to_u64().to_be_bytes(), &mut key.0)
        .is_err()
    {
        unreachable!("HKDF-SHA256 output of {SA_KEY_LEN} bytes is within its limit");
    }
    key
}

/// What the caller must do for an [`IpsecSession`], in the order given.
///
/// "Inbound" SAs run from the remote address to the local one, "outbound" ones from
/// the local address to the remote one.
#[derive(Debug)]
pub enum IpsecAction {
    /// Allocate an inbound SPI (XFRM allocspi, src = remote, dst = local) and report
    /// it with [`IpsecSession::on_spi_allocated`], or the failure with
    /// [`IpsecSession::on_alloc_failed`].
    AllocInbound,
    /// Install the inbound SA for `spi` (it replaces the larval state allocspi left).
    /// If this fails, skip the rest of the batch (do NOT send the [`SaInit`]) and call
    /// [`IpsecSession::on_install_failed`].
    InstallInbound {
        /// The allocated SPI.
        spi: u32,
        /// Its key.
        key: SaKey,
    },
    /// Send this body to the peer as overlay control sub-tag
    /// [`SUBTAG_CRYPTO_INIT_SA_REMOTE`].
    SendInit([u8; SA_INIT_LEN]),
    /// Install the outbound SA for `spi`, then point the outbound policy for this
    /// address pair at it (one atomic policy update). If either fails, call
    /// [`IpsecSession::on_outbound_failed`].
    InstallOutbound {
        /// The peer's SPI.
        spi: u32,
        /// Its key.
        key: SaKey,
    },
    /// Delete the inbound SA for `spi` (gone already is fine).
    DeleteInbound {
        /// The SPI.
        spi: u32,
    },
    /// Delete the outbound SA for `spi`, and the outbound policy if it still points
    /// at `spi` (a policy that moved on to a newer SPI stays).
    DeleteOutbound {
        /// The SPI.
        spi: u32,
    },
}

/// The receiving half's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alloc {
    /// Nothing asked; allocate at this time (first exchange, rekey or retry).
    Due(Instant),
    /// Nothing asked, nothing due (no rekeying).
    Idle,
    /// An [`IpsecAction::AllocInbound`] is out.
    Pending,
}

/// One fast datapath connection's IPsec key exchange (both directions), for a
/// connection with a password. See the [module docs](self) for the protocol.
pub struct IpsecSession {
    local: PeerName,
    remote: PeerName,
    key: SessionKey,
    rekey_every: Option<Duration>,
    alloc: Alloc,
    /// Consecutive failed allocations or installs, for the retry backoff.
    failures: u32,
    /// The inbound SPI the sender was last told about.
    inbound: Option<u32>,
    /// What the last exchange replaced: (new SPI, old SPI), so a failed install of
    /// the new one can bring the old one back.
    replaced: Option<(u32, u32)>,
    /// Old inbound SAs and when to delete them.
    retiring_in: Vec<(u32, Instant)>,
    /// The outbound SPI and the nonce it came with.
    outbound: Option<(u32, [u8; NONCE_LEN])>,
    /// Old outbound SAs and when to delete them.
    retiring_out: Vec<(u32, Instant)>,
    /// What the last outbound install replaced: (new SPI, old SPI and nonce).
    replaced_out: Option<(u32, (u32, [u8; NONCE_LEN]))>,
    torn_down: bool,
}

impl std::fmt::Debug for IpsecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpsecSession")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("inbound", &self.inbound)
            .field("outbound", &self.outbound.map(|(spi, _)| spi))
            .field("retiring_in", &self.retiring_in)
            .field("retiring_out", &self.retiring_out)
            .finish_non_exhaustive()
    }
}

impl Drop for IpsecSession {
    fn drop(&mut self) {
        self.key.0.zeroize();
    }
}

impl IpsecSession {
    /// A session for the connection from `local` to `remote` keyed by its session
    /// key. `rekey_every` renews the inbound SA periodically (weft peers only; `None`
    /// for a weaver). The first [`poll`](Self::poll) at or after `now` asks for the
    /// first SPI.
    pub fn new(
        local: PeerName,
        remote: PeerName,
        key: SessionKey,
        rekey_every: Option<Duration>,
        now: Instant,
    ) -> Self {
        IpsecSession {
            local,
            remote,
            key,
            rekey_every,
            alloc: Alloc::Due(now),
            failures: 0,
            inbound: None,
            replaced: None,
            retiring_in: Vec::new(),
            outbound: None,
            retiring_out: Vec::new(),
            replaced_out: None,
            torn_down: false,
        }
    }

    /// Timers: the first allocation, rekeying, retries, and the deletion of old SAs
    /// whose grace has passed.
    pub fn poll(&mut self, now: Instant) -> Vec<IpsecAction> {
        let mut actions = Vec::new();
        if self.torn_down {
            return actions;
        }
        if let Alloc::Due(at) = self.alloc
            && now >= at
        {
            self.alloc = Alloc::Pending;
            actions.push(IpsecAction::AllocInbound);
        }
        self.retiring_in.retain(|&(spi, at)| {
            let keep = now < at;
            if !keep {
                actions.push(IpsecAction::DeleteInbound { spi });
            }
            keep
        });
        self.retiring_out.retain(|&(spi, at)| {
            let keep = now < at;
            if !keep {
                actions.push(IpsecAction::DeleteOutbound { spi });
            }
            keep
        });
        actions
    }

    /// When [`poll`](Self::poll) has something to do next, if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.torn_down {
            return None;
        }
        let alloc = match self.alloc {
            Alloc::Due(at) => Some(at),
            Alloc::Idle | Alloc::Pending => None,
        };
        alloc
            .into_iter()
            .chain(self.retiring_in.iter().map(|&(_, at)| at))
            .chain(self.retiring_out.iter().map(|&(_, at)| at))
            .min()
    }

    /// The kernel allocated `spi` for an [`IpsecAction::AllocInbound`]; `nonce` is 32
    /// fresh bytes from a CSPRNG. Returns [`IpsecAction::InstallInbound`] then
    /// [`IpsecAction::SendInit`]. An SPI nobody asked for (after
    /// [`teardown`](Self::teardown)) is handed back for deletion; one of this
    /// session's SAs in use counts as a failed allocation.
    pub fn on_spi_allocated(
        &mut self,
        spi: u32,
        nonce: [u8; NONCE_LEN],
        now: Instant,
    ) -> Vec<IpsecAction> {
        if self.inbound_spis().any(|s| s == spi) {
            // Not a fresh SPI (the kernel never does this): never touch an SA in use.
            return self.on_alloc_failed(now);
        }
        if self.torn_down || self.alloc != Alloc::Pending {
            return vec![IpsecAction::DeleteInbound { spi }];
        }
        let key = derive_key(&self.key, &nonce, self.local);
        let body = SaInit { nonce, spi }.encode();
        self.replaced = None;
        if let Some(old) = self.inbound.replace(spi) {
            self.retiring_in.push((old, now + INBOUND_GRACE));
            self.replaced = Some((spi, old));
        }
        self.failures = 0;
        self.alloc = match self.rekey_every {
            Some(every) => Alloc::Due(now + every),
            None => Alloc::Idle,
        };
        vec![
            IpsecAction::InstallInbound { spi, key },
            IpsecAction::SendInit(body),
        ]
    }

    /// An [`IpsecAction::AllocInbound`] failed: try again later (backoff from
    /// [`RETRY_MIN`] to [`RETRY_MAX`]). Any current inbound SA stays in use.
    pub fn on_alloc_failed(&mut self, now: Instant) -> Vec<IpsecAction> {
        if !self.torn_down && self.alloc == Alloc::Pending {
            self.alloc = Alloc::Due(now + self.backoff());
        }
        Vec::new()
    }

    /// An [`IpsecAction::InstallInbound`] for `spi` failed (and its
    /// [`IpsecAction::SendInit`] was not sent): forget `spi` (its larval state is
    /// deleted), keep using the SA it was to replace, try again later.
    pub fn on_install_failed(&mut self, spi: u32, now: Instant) -> Vec<IpsecAction> {
        if self.torn_down || self.inbound != Some(spi) {
            return Vec::new();
        }
        self.inbound = None;
        if let Some((new, old)) = self.replaced.take()
            && new == spi
        {
            self.retiring_in.retain(|&(s, _)| s != old);
            self.inbound = Some(old);
        }
        self.alloc = Alloc::Due(now + self.backoff());
        vec![IpsecAction::DeleteInbound { spi }]
    }

    /// A `CryptoInitSARemote` body from the peer: install the outbound SA it names
    /// ([`IpsecAction::InstallOutbound`]). A later one (rekey) also retires the
    /// previous outbound SA after [`OUTBOUND_GRACE`]. A repeat of the current one is
    /// ignored; after [`teardown`](Self::teardown) everything is.
    pub fn on_sa_init(
        &mut self,
        body: &[u8],
        now: Instant,
    ) -> Result<Vec<IpsecAction>, IpsecError> {
        let init = SaInit::decode(body)?;
        if init.spi == 0 {
            return Err(IpsecError::InvalidSpi);
        }
        if self.torn_down {
            return Ok(Vec::new());
        }
        if self.outbound == Some((init.spi, init.nonce)) {
            return Ok(Vec::new());
        }
        let mut actions = Vec::new();
        // An SPI we still hold an SA for, with another key (the peer deleted it and
        // its kernel handed the SPI out again): the old SA must go first. The policy
        // blocks (no SA) rather than leaks in between.
        let held = self.outbound.map(|(s, _)| s) == Some(init.spi)
            || self.retiring_out.iter().any(|&(s, _)| s == init.spi);
        if held {
            self.retiring_out.retain(|&(s, _)| s != init.spi);
            actions.push(IpsecAction::DeleteOutbound { spi: init.spi });
        }
        let key = derive_key(&self.key, &init.nonce, self.remote);
        self.replaced_out = None;
        if let Some(old) = self.outbound.replace((init.spi, init.nonce))
            && old.0 != init.spi
        {
            self.retiring_out.push((old.0, now + OUTBOUND_GRACE));
            self.replaced_out = Some((init.spi, old));
        }
        actions.push(IpsecAction::InstallOutbound { spi: init.spi, key });
        Ok(actions)
    }

    /// An [`IpsecAction::InstallOutbound`] for `spi` failed: delete what it may have
    /// left, and go back to the outbound SA it was to replace, if that is still
    /// installed.
    pub fn on_outbound_failed(&mut self, spi: u32) -> Vec<IpsecAction> {
        if self.torn_down || self.outbound.map(|(s, _)| s) != Some(spi) {
            return Vec::new();
        }
        self.outbound = None;
        if let Some((new, old)) = self.replaced_out.take()
            && new == spi
            && self.retiring_out.iter().any(|&(s, _)| s == old.0)
        {
            self.retiring_out.retain(|&(s, _)| s != old.0);
            self.outbound = Some(old);
        }
        vec![IpsecAction::DeleteOutbound { spi }]
    }

    /// The SPI of the outbound SA in use, once the peer's `CryptoInitSARemote` came.
    pub fn outbound_spi(&self) -> Option<u32> {
        self.outbound.map(|(spi, _)| spi)
    }

    /// The SPIs of all inbound SAs this session has installed (the current one and
    /// those in their grace period).
    pub fn inbound_spis(&self) -> impl Iterator<Item = u32> + '_ {
        self.inbound
            .into_iter()
            .chain(self.retiring_in.iter().map(|&(spi, _)| spi))
    }

    /// The connection is gone: delete every SA this session installed (and the
    /// policy, through [`IpsecAction::DeleteOutbound`]). The session does nothing
    /// afterwards; an SPI allocated later is handed back for deletion.
    pub fn teardown(&mut self) -> Vec<IpsecAction> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut actions: Vec<IpsecAction> = self
            .inbound_spis()
            .map(|spi| IpsecAction::DeleteInbound { spi })
            .collect();
        actions.extend(
            self.outbound
                .map(|(spi, _)| spi)
                .into_iter()
                .chain(self.retiring_out.iter().map(|&(spi, _)| spi))
                .map(|spi| IpsecAction::DeleteOutbound { spi }),
        );
        self.inbound = None;
        self.retiring_in.clear();
        self.outbound = None;
        self.retiring_out.clear();
        actions
    }

    fn backoff(&mut self) -> Duration {
        let d = RETRY_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(RETRY_MAX);
        self.failures = self.failures.saturating_add(1);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PeerName = PeerName([0xaa, 0, 0, 0, 0, 0x01]);
    const B: PeerName = PeerName([0xaa, 0, 0, 0, 0, 0x02]);
    const KEY: SessionKey = SessionKey([0x42; 32]);

    #[test]
    fn derive_key_matches_go_and_python() {
        // Vector computed independently, twice, with the same inputs:
        // - Go 1.19, golang.org/x/crypto/hkdf as vendored by Weave Net 2.8.1
        //   (`hkdf.New(sha256.New, ikm, nonce, info)` read with `io.ReadFull`, as its
        //   `deriveKey` does);
        // - Python 3, `cryptography` 48's `HKDF(SHA256(), length=36, salt=nonce,
        //   info=info).derive(ikm)`.
        // ikm = 00 01 .. 1f, nonce = a0 a1 .. bf, receiver aa:00:00:00:00:01 (info
        // 00 00 aa 00 00 00 00 01).
        let ikm = SessionKey(std::array::from_fn(|i| i as u8));
        let nonce: [u8; 32] = std::array::from_fn(|i| 0xa0 + i as u8);
        let key = derive_key(&ikm, &nonce, A);
        let want = [
            0x0c, 0xe9, 0xcc, 0x96, 0x97, 0x4a, 0xd0, 0x61, 0x29, 0x4b, 0xbc, 0x9c, 0x30, 0xae,
            0x7e, 0x26, 0x9c, 0x20, 0x45, 0x59, 0xd4, 0x43, 0x38, 0xb6, 0xf4, 0x1a, 0x5d, 0x16,
            0x21, 0x92, 0xa7, 0x20, 0x9f, 0x2b, 0xdc, 0x62,
        ];
        assert_eq!(key.as_bytes(), &want);
        // The receiver's name is part of the derivation.
        assert_ne!(derive_key(&ikm, &nonce, B).as_bytes(), &want);
    }

    #[test]
    fn sa_init_round_trips_and_has_weaves_layout() {
        let init = SaInit {
            nonce: [7; 32],
            spi: 0xc0ff_ee01,
        };
        let b = init.encode();
        assert_eq!(&b[..32], &[7; 32]);
        assert_eq!(&b[32..36], &[0xc0, 0xff, 0xee, 0x01]);
        assert_eq!(&b[36..], &[0; 28]);
        assert_eq!(SaInit::decode(&b), Ok(init.clone()));
        // Trailing bytes are ignored, as Weave does.
        let mut junk = b;
        junk[63] = 0xff;
        assert_eq!(SaInit::decode(&junk), Ok(init));
    }

    #[test]
    fn sa_init_rejects_wrong_sizes() {
        assert_eq!(SaInit::decode(&[]), Err(IpsecError::Empty));
        assert_eq!(
            SaInit::decode(&[0; 63]),
            Err(IpsecError::InvalidPayloadSize(63))
        );
        assert_eq!(
            SaInit::decode(&[0; 65]),
            Err(IpsecError::InvalidPayloadSize(65))
        );
        assert_eq!(
            IpsecError::InvalidPayloadSize(3).to_string(),
            "CryptoInitSARemote: invalid payload size: 3 (expected 64)"
        );
        let now = Instant::now();
        let mut s = IpsecSession::new(A, B, KEY, None, now);
        assert_eq!(
            s.on_sa_init(&[1; 10], now).unwrap_err(),
            IpsecError::InvalidPayloadSize(10)
        );
        let zero_spi = SaInit {
            nonce: [1; 32],
            spi: 0,
        }
        .encode();
        assert_eq!(
            s.on_sa_init(&zero_spi, now).unwrap_err(),
            IpsecError::InvalidSpi
        );
        assert_eq!(s.outbound_spi(), None);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let key = derive_key(&KEY, &[1; 32], A);
        assert_eq!(format!("{key:?}"), "SaKey(..)");
        let action = IpsecAction::InstallInbound { spi: 0x100, key };
        assert_eq!(
            format!("{action:?}"),
            "InstallInbound { spi: 256, key: SaKey(..) }"
        );
        let s = IpsecSession::new(A, B, KEY, None, Instant::now());
        assert!(!format!("{s:?}").contains("66")); // 0x42 = 66
        let init = SaInit {
            nonce: [0x42; 32],
            spi: 1,
        };
        assert_eq!(format!("{init:?}"), "SaInit { spi: 0x00000001, .. }");
    }

    /// The kernel side of one host, as far as the sessions can tell: SPIs handed out
    /// and the SAs installed, by SPI, with their keys.
    #[derive(Default)]
    struct Kernel {
        next_spi: u32,
        inbound: Vec<(u32, [u8; SA_KEY_LEN])>,
        outbound: Vec<(u32, [u8; SA_KEY_LEN])>,
        /// The SPI the outbound policy points at.
        policy: Option<u32>,
    }

    /// Runs `actions` for the session `s` on `kernel`; returns the messages to send.
    fn run(
        s: &mut IpsecSession,
        kernel: &mut Kernel,
        actions: Vec<IpsecAction>,
        now: Instant,
    ) -> Vec<[u8; SA_INIT_LEN]> {
        let mut sent = Vec::new();
        let mut queue: std::collections::VecDeque<_> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                IpsecAction::AllocInbound => {
                    kernel.next_spi += 1;
                    let spi = 0x1000 + kernel.next_spi;
                    let nonce = [kernel.next_spi as u8; 32];
                    queue.extend(s.on_spi_allocated(spi, nonce, now));
                }
                IpsecAction::InstallInbound { spi, key } => {
                    kernel.inbound.push((spi, *key.as_bytes()))
                }
                IpsecAction::SendInit(body) => sent.push(body),
                IpsecAction::InstallOutbound { spi, key } => {
                    kernel.outbound.push((spi, *key.as_bytes()));
                    kernel.policy = Some(spi);
                }
                IpsecAction::DeleteInbound { spi } => {
                    kernel.inbound.retain(|&(s, _)| s != spi);
                }
                IpsecAction::DeleteOutbound { spi } => {
                    kernel.outbound.retain(|&(s, _)| s != spi);
                    if kernel.policy == Some(spi) {
                        kernel.policy = None;
                    }
                }
            }
        }
        sent
    }

    /// Two connected sessions and their kernels.
    struct Pair {
        a: IpsecSession,
        b: IpsecSession,
        ka: Kernel,
        kb: Kernel,
    }

    impl Pair {
        fn new(rekey: Option<Duration>, now: Instant) -> Pair {
            Pair {
                a: IpsecSession::new(A, B, KEY, rekey, now),
                b: IpsecSession::new(B, A, KEY, rekey, now),
                ka: Kernel::default(),
                kb: Kernel {
                    next_spi: 100,
                    ..Kernel::default()
                },
            }
        }

        /// Polls both at `now` and delivers every message at once.
        fn step(&mut self, now: Instant) {
            let pa = self.a.poll(now);
            let to_b = run(&mut self.a, &mut self.ka, pa, now);
            let pb = self.b.poll(now);
            let to_a = run(&mut self.b, &mut self.kb, pb, now);
            for m in to_b {
                let acts = self.b.on_sa_init(&m, now).unwrap();
                run(&mut self.b, &mut self.kb, acts, now);
            }
            for m in to_a {
                let acts = self.a.on_sa_init(&m, now).unwrap();
                run(&mut self.a, &mut self.ka, acts, now);
            }
        }

        /// Each direction's sender has an outbound SA whose SPI and key are the
        /// receiver's newest inbound SA, and its policy points at it.
        fn assert_matched(&self) {
            for (snd, ks, rcv, kr) in [
                (&self.a, &self.ka, &self.b, &self.kb),
                (&self.b, &self.kb, &self.a, &self.ka),
            ] {
                let spi = snd.outbound_spi().expect("outbound SA");
                assert_eq!(ks.policy, Some(spi));
                assert_eq!(rcv.inbound, Some(spi));
                let out = ks.outbound.iter().find(|e| e.0 == spi).unwrap();
                let inb = kr.inbound.iter().find(|e| e.0 == spi).unwrap();
                assert_eq!(out.1, inb.1, "both ends derive the same key");
            }
        }
    }

    #[test]
    fn two_sessions_agree_on_spis_and_keys() {
        let t0 = Instant::now();
        let mut p = Pair::new(None, t0);
        assert_eq!(p.a.outbound_spi(), None);
        p.step(t0);
        p.assert_matched();
        assert_eq!(p.a.outbound_spi(), Some(0x1000 + 101));
        assert_eq!(p.b.outbound_spi(), Some(0x1000 + 1));
        assert_eq!(p.a.inbound_spis().collect::<Vec<_>>(), [0x1001]);
        // The keys differ per direction (different nonce and receiver).
        assert_ne!(p.ka.inbound[0].1, p.ka.outbound[0].1);
        // Nothing more to do without rekeying.
        assert_eq!(p.a.next_deadline(), None);
        assert!(p.a.poll(t0 + Duration::from_secs(3600)).is_empty());
        // A repeated message changes nothing.
        let again = SaInit {
            nonce: [1; 32],
            spi: 0x1001,
        }
        .encode();
        assert!(p.b.on_sa_init(&again, t0).unwrap().is_empty());
    }

    #[test]
    fn teardown_deletes_everything_installed() {
        let t0 = Instant::now();
        let mut p = Pair::new(Some(Duration::from_secs(60)), t0);
        p.step(t0);
        p.step(t0 + Duration::from_secs(60)); // rekey: old SAs in their grace
        let acts = p.a.teardown();
        let n = acts.len();
        run(&mut p.a, &mut p.ka, acts, t0);
        assert_eq!(n, 4, "two inbound, two outbound");
        assert!(p.ka.inbound.is_empty() && p.ka.outbound.is_empty() && p.ka.policy.is_none());
        assert!(p.a.teardown().is_empty());
        assert!(p.a.poll(t0 + Duration::from_secs(1000)).is_empty());
        assert_eq!(p.a.outbound_spi(), None);
        assert_eq!(p.a.inbound_spis().count(), 0);
        // Late news is ignored or undone.
        let late = SaInit {
            nonce: [9; 32],
            spi: 0x9999,
        }
        .encode();
        assert!(p.a.on_sa_init(&late, t0).unwrap().is_empty());
        assert!(matches!(
            p.a.on_spi_allocated(0x7777, [0; 32], t0)[..],
            [IpsecAction::DeleteInbound { spi: 0x7777 }]
        ));
    }

    #[test]
    fn rekey_keeps_old_inbound_until_grace() {
        let t0 = Instant::now();
        let every = Duration::from_secs(600);
        let mut p = Pair::new(Some(every), t0);
        p.step(t0);
        let (a_in0, b_in0) = (p.a.inbound.unwrap(), p.b.inbound.unwrap());
        assert_eq!(p.a.next_deadline(), Some(t0 + every));

        let t1 = t0 + every;
        p.step(t1);
        p.assert_matched();
        let (a_in1, b_in1) = (p.a.inbound.unwrap(), p.b.inbound.unwrap());
        assert_ne!(a_in0, a_in1);
        // Both inbound SAs exist, on both hosts; the senders switched.
        assert_eq!(p.a.inbound_spis().collect::<Vec<_>>(), [a_in1, a_in0]);
        assert!(p.ka.inbound.iter().any(|e| e.0 == a_in0));
        assert_eq!(p.kb.policy, Some(a_in1));
        assert_eq!(p.kb.outbound.len(), 2);

        // The sender drops its old outbound SA after its short grace...
        p.step(t1 + OUTBOUND_GRACE);
        assert_eq!(
            p.kb.outbound.iter().map(|e| e.0).collect::<Vec<_>>(),
            [a_in1]
        );
        assert_eq!(
            p.kb.policy,
            Some(a_in1),
            "deleting the old SA keeps the policy"
        );
        // ...the receiver keeps the old inbound one until its long grace.
        p.step(t1 + INBOUND_GRACE - Duration::from_millis(1));
        assert!(p.ka.inbound.iter().any(|e| e.0 == a_in0));
        p.step(t1 + INBOUND_GRACE);
        assert_eq!(
            p.ka.inbound.iter().map(|e| e.0).collect::<Vec<_>>(),
            [a_in1]
        );
        assert_eq!(
            p.kb.inbound.iter().map(|e| e.0).collect::<Vec<_>>(),
            [b_in1]
        );
        assert_ne!(b_in0, b_in1);
        assert_eq!(p.a.inbound_spis().collect::<Vec<_>>(), [a_in1]);
        p.assert_matched();
    }

    #[test]
    fn failed_allocations_and_installs_retry_with_backoff() {
        let t0 = Instant::now();
        let mut s = IpsecSession::new(A, B, KEY, None, t0);
        assert!(matches!(s.poll(t0)[..], [IpsecAction::AllocInbound]));
        assert!(s.poll(t0).is_empty(), "one allocation at a time");
        assert!(s.on_alloc_failed(t0).is_empty());
        assert_eq!(s.next_deadline(), Some(t0 + RETRY_MIN));
        assert!(s.poll(t0 + Duration::from_millis(999)).is_empty());
        let t1 = t0 + RETRY_MIN;
        assert!(matches!(s.poll(t1)[..], [IpsecAction::AllocInbound]));
        s.on_alloc_failed(t1);
        assert_eq!(s.next_deadline(), Some(t1 + 2 * RETRY_MIN));
        let t2 = t1 + 2 * RETRY_MIN;
        assert!(matches!(s.poll(t2)[..], [IpsecAction::AllocInbound]));
        let acts = s.on_spi_allocated(0x500, [3; 32], t2);
        assert!(matches!(
            acts[..],
            [
                IpsecAction::InstallInbound { spi: 0x500, .. },
                IpsecAction::SendInit(_)
            ]
        ));
        // The install failed: the larval state goes, and a later retry.
        assert!(matches!(
            s.on_install_failed(0x500, t2)[..],
            [IpsecAction::DeleteInbound { spi: 0x500 }]
        ));
        assert_eq!(s.inbound_spis().count(), 0);
        assert_eq!(
            s.next_deadline(),
            Some(t2 + RETRY_MIN),
            "success reset the backoff"
        );
        // Many failures: capped.
        let mut t = t2;
        for _ in 0..20 {
            t += RETRY_MAX;
            assert!(matches!(s.poll(t)[..], [IpsecAction::AllocInbound]));
            s.on_alloc_failed(t);
        }
        assert_eq!(s.next_deadline(), Some(t + RETRY_MAX));
    }

    #[test]
    fn a_stale_or_reused_spi_is_never_installed() {
        let t0 = Instant::now();
        let mut s = IpsecSession::new(A, B, KEY, Some(Duration::from_secs(60)), t0);
        // Nobody asked: handed back.
        assert!(matches!(
            s.on_spi_allocated(0x900, [1; 32], t0)[..],
            [IpsecAction::DeleteInbound { spi: 0x900 }]
        ));
        s.poll(t0);
        s.on_spi_allocated(0x901, [1; 32], t0);
        let t1 = t0 + Duration::from_secs(60);
        assert!(matches!(s.poll(t1)[..], [IpsecAction::AllocInbound]));
        // The SPI in use again: not installed, not deleted, retried later.
        assert!(s.on_spi_allocated(0x901, [2; 32], t1).is_empty());
        assert_eq!(s.inbound_spis().collect::<Vec<_>>(), [0x901]);
        assert_eq!(s.next_deadline(), Some(t1 + RETRY_MIN));
    }

    #[test]
    fn failed_rekey_install_keeps_the_old_inbound_sa() {
        let t0 = Instant::now();
        let every = Duration::from_secs(60);
        let mut s = IpsecSession::new(A, B, KEY, Some(every), t0);
        s.poll(t0);
        s.on_spi_allocated(0x600, [1; 32], t0);
        assert!(matches!(
            s.poll(t0 + every)[..],
            [IpsecAction::AllocInbound]
        ));
        s.on_spi_allocated(0x601, [2; 32], t0 + every);
        assert!(matches!(
            s.on_install_failed(0x601, t0 + every)[..],
            [IpsecAction::DeleteInbound { spi: 0x601 }]
        ));
        assert_eq!(s.inbound_spis().collect::<Vec<_>>(), [0x600]);
        // The old SA is not deleted when its grace would have ended.
        assert!(
            s.poll(t0 + every + INBOUND_GRACE)
                .iter()
                .all(|a| !matches!(a, IpsecAction::DeleteInbound { .. }))
        );
    }

    #[test]
    fn failed_outbound_install_goes_back_to_the_old_sa() {
        let t0 = Instant::now();
        let mut s = IpsecSession::new(A, B, KEY, None, t0);
        let first = SaInit {
            nonce: [1; 32],
            spi: 0x700,
        }
        .encode();
        let second = SaInit {
            nonce: [2; 32],
            spi: 0x701,
        }
        .encode();
        assert!(matches!(
            s.on_sa_init(&first, t0).unwrap()[..],
            [IpsecAction::InstallOutbound { spi: 0x700, .. }]
        ));
        assert!(matches!(
            s.on_sa_init(&second, t0).unwrap()[..],
            [IpsecAction::InstallOutbound { spi: 0x701, .. }]
        ));
        assert!(matches!(
            s.on_outbound_failed(0x701)[..],
            [IpsecAction::DeleteOutbound { spi: 0x701 }]
        ));
        assert_eq!(s.outbound_spi(), Some(0x700));
        assert!(
            no_deletes(s.poll(t0 + OUTBOUND_GRACE)),
            "0x700 is no longer retiring"
        );
        // A stale failure report changes nothing.
        assert!(s.on_outbound_failed(0x701).is_empty());
        // The first failure with nothing to go back to leaves no outbound SA.
        let mut s = IpsecSession::new(A, B, KEY, None, t0);
        s.on_sa_init(&first, t0).unwrap();
        s.on_outbound_failed(0x700);
        assert_eq!(s.outbound_spi(), None);
    }

    #[test]
    fn a_reused_spi_with_a_new_key_replaces_the_old_sa() {
        let t0 = Instant::now();
        let mut s = IpsecSession::new(A, B, KEY, None, t0);
        let first = SaInit {
            nonce: [1; 32],
            spi: 0x800,
        }
        .encode();
        let reused = SaInit {
            nonce: [2; 32],
            spi: 0x800,
        }
        .encode();
        s.on_sa_init(&first, t0).unwrap();
        assert!(matches!(
            s.on_sa_init(&reused, t0).unwrap()[..],
            [
                IpsecAction::DeleteOutbound { spi: 0x800 },
                IpsecAction::InstallOutbound { spi: 0x800, .. }
            ]
        ));
        assert!(no_deletes(s.poll(t0 + OUTBOUND_GRACE)));
    }

    fn no_deletes(actions: Vec<IpsecAction>) -> bool {
        actions.iter().all(|a| {
            !matches!(
                a,
                IpsecAction::DeleteInbound { .. } | IpsecAction::DeleteOutbound { .. }
            )
        })
    }
}
