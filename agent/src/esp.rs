//! The kernel side of the encrypted fast datapath: carries out what each
//! connection's [`IpsecSession`] asks (SPIs, SAs, the outbound policy) through XFRM
//! netlink ([`Xfrm`]), and owns what outlives a connection:
//!
//! - the catch-all block policy (installed first, kept while encryption is on): a
//!   frame the eBPF datapath marked for an encrypted peer that no per-peer policy
//!   covers is dropped by XFRM, never sent in clear;
//! - a closed connection's SAs and policy, kept for as long as its datapath entry
//!   lingers (a restart of either end does not interrupt encrypted traffic), then
//!   removed;
//! - the SAs and policies an earlier run of weft left: used while their peers
//!   reconnect, replaced by the new connections' own, removed after the same time.
//!
//! Only weft's own XFRM state is touched (see [`Xfrm`]); with encryption off the
//! agent removes all of it at start.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use weft::ipsec::{IpsecAction, IpsecSession, NONCE_LEN, SA_INIT_LEN};

use crate::xfrm::{EspUnavailable, OwnState, SaDirection, SaParams, Xfrm, errno};

/// How often the block policy and the live outbound policies are installed again
/// (someone may have flushed them; a marked frame with no policy would leave in
/// clear).
const REASSERT_INTERVAL: Duration = Duration::from_secs(1);

/// What carrying out a session's actions produced.
#[derive(Default)]
pub struct Outcome {
    /// CryptoInitSARemote bodies to send to the peer over the control connection.
    pub send: Vec<[u8; SA_INIT_LEN]>,
    /// The first error, for the log and the connection's status.
    pub error: Option<String>,
    /// The outbound SA or policy could not be installed: the exchange must start
    /// over (the connection is closed, as Weave does).
    pub fatal: bool,
}

/// A closed connection's XFRM state, removed at `until`.
struct Retiring {
    remote: Ipv4Addr,
    deletes: Vec<IpsecAction>,
    until: Instant,
}

/// The node's XFRM state: see the module documentation.
pub struct Esp {
    xfrm: Xfrm,
    local: Ipv4Addr,
    retiring: Vec<Retiring>,
    /// An earlier run's state and when it goes.
    stale: Option<(OwnState, Instant)>,
    /// The SPI each peer's outbound policy points at (as installed by this run).
    outbound: HashMap<Ipv4Addr, u32>,
    /// When the policies are installed again.
    next_reassert: Instant,
}

impl Esp {
    /// Checks that the kernel can do ESP with `rfc4106(gcm(aes))` and applies XFRM
    /// policies to the underlay (`iface`), then installs the block policy. An earlier
    /// run's state is kept for `linger`.
    pub fn start(
        local: Ipv4Addr,
        iface: &str,
        linger: Duration,
        now: Instant,
    ) -> Result<Self, EspUnavailable> {
        let unavailable = |what: &str, e: std::io::Error| EspUnavailable {
            reason: format!("{what}: {e}"),
            errno: errno(&e),
        };
        let xfrm = Xfrm::open().map_err(|e| unavailable("opening XFRM netlink", e))?;
        xfrm.esp_support()?;
        // With disable_xfrm the kernel skips policy lookups on the device's routes:
        // marked frames would leave in clear.
        for dev in ["all", iface] {
            let path = format!("/proc/sys/net/ipv4/conf/{dev}/disable_xfrm");
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() != "0") {
                return Err(EspUnavailable {
                    reason: format!(
                        "net.ipv4.conf.{dev}.disable_xfrm is set: the kernel would skip IPsec \
                         policies"
                    ),
                    errno: None,
                });
            }
        }
        // The leak guard: a marked frame no per-peer policy covers is dropped, never
        // sent in clear (an earlier run's marked traffic keeps flowing through its
        // own policies and SAs meanwhile).
        xfrm.ensure_block_policy()
            .map_err(|e| unavailable("installing the XFRM block policy", e))?;
        let stale = match xfrm.own_state() {
            Ok(state) => Some((state, now + linger)),
            Err(e) => {
                tracing::warn!("listing weft's XFRM state of an earlier run: {e}");
                None
            }
        };
        Ok(Self {
            xfrm,
            local,
            retiring: Vec::new(),
            stale,
            outbound: HashMap::new(),
            next_reassert: now + REASSERT_INTERVAL,
        })
    }

    /// Removes every XFRM state and policy of weft (encryption is off, or `weft
    /// reset`). Returns how many; a kernel without XFRM netlink has none.
    pub fn remove_all() -> std::io::Result<usize> {
        match Xfrm::open() {
            Ok(xfrm) => xfrm.remove_own(false),
            Err(e) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Carries out `actions` of `session` (a connection to `remote`), feeding the
    /// session what the kernel answers.
    pub fn execute(
        &mut self,
        remote: Ipv4Addr,
        session: &mut IpsecSession,
        actions: Vec<IpsecAction>,
        now: Instant,
    ) -> Outcome {
        let mut out = Outcome::default();
        let mut queue: std::collections::VecDeque<IpsecAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            let result = match action {
                IpsecAction::AllocInbound => match self.xfrm.alloc_spi(remote, self.local) {
                    Ok(spi) => {
                        let mut nonce = [0u8; NONCE_LEN];
                        match getrandom::fill(&mut nonce) {
                            Ok(()) => {
                                queue.extend(session.on_spi_allocated(spi, nonce, now));
                                Ok(())
                            }
                            Err(e) => {
                                let _ = self.xfrm.delete_sa(remote, self.local, spi);
                                queue.extend(session.on_alloc_failed(now));
                                Err(format!("no random nonce: {e}"))
                            }
                        }
                    }
                    Err(e) => {
                        queue.extend(session.on_alloc_failed(now));
                        Err(format!("allocating an inbound SPI: {e}"))
                    }
                },
                IpsecAction::InstallInbound { spi, key } => {
                    let sa = SaParams {
                        src: remote,
                        dst: self.local,
                        spi,
                        key: &key,
                        direction: SaDirection::Inbound,
                    };
                    self.xfrm.install_sa(&sa).map_err(|e| {
                        // No SA, no SPI message: the session retries later.
                        queue.retain(|a| !matches!(a, IpsecAction::SendInit(_)));
                        queue.extend(session.on_install_failed(spi, now));
                        format!("installing the inbound SA: {e}")
                    })
                }
                IpsecAction::SendInit(body) => {
                    out.send.push(body);
                    Ok(())
                }
                IpsecAction::InstallOutbound { spi, key } => {
                    let sa = SaParams {
                        src: self.local,
                        dst: remote,
                        spi,
                        key: &key,
                        direction: SaDirection::Outbound,
                    };
                    match self
                        .xfrm
                        .install_sa(&sa)
                        .and_then(|()| self.xfrm.set_policy(self.local, remote, spi))
                    {
                        Ok(()) => {
                            self.outbound.insert(remote, spi);
                            Ok(())
                        }
                        Err(e) => {
                            queue.extend(session.on_outbound_failed(spi));
                            out.fatal = true;
                            Err(format!("installing the outbound SA and policy: {e}"))
                        }
                    }
                }
                IpsecAction::DeleteInbound { spi } => self.delete(remote, self.local, spi),
                IpsecAction::DeleteOutbound { spi } => self.delete(self.local, remote, spi),
            };
            if let Err(e) = result {
                out.error.get_or_insert(e);
            }
        }
        out
    }

    /// Deletes an SA; an outbound one's policy first, if it still points at it.
    fn delete(&mut self, src: Ipv4Addr, dst: Ipv4Addr, spi: u32) -> Result<(), String> {
        if src == self.local {
            if self.outbound.get(&dst) == Some(&spi) {
                self.outbound.remove(&dst);
            }
            self.xfrm
                .delete_policy(src, dst, Some(spi))
                .map_err(|e| format!("deleting the outbound policy: {e}"))?;
        }
        self.xfrm
            .delete_sa(src, dst, spi)
            .map_err(|e| format!("deleting an SA: {e}"))
    }

    /// A connection closed: its SAs (and its policy, unless a newer connection to the
    /// same peer replaced it) go at `until`, with its datapath entry.
    pub fn retire(&mut self, remote: Ipv4Addr, mut session: IpsecSession, until: Instant) {
        self.retiring.push(Retiring {
            remote,
            deletes: session.teardown(),
            until,
        });
    }

    /// Removes what is due: retired connections' state, an earlier run's state; and
    /// installs the block policy and the live outbound policies again now and then.
    pub fn poll(&mut self, now: Instant) {
        if now >= self.next_reassert {
            self.next_reassert = now + REASSERT_INTERVAL;
            self.reassert();
        }
        let (due, keep): (Vec<Retiring>, Vec<Retiring>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|r| r.until <= now);
        self.retiring = keep;
        for r in due {
            for action in r.deletes {
                let result = match action {
                    IpsecAction::DeleteInbound { spi } => self.delete(r.remote, self.local, spi),
                    IpsecAction::DeleteOutbound { spi } => self.delete(self.local, r.remote, spi),
                    _ => Ok(()),
                };
                if let Err(e) = result {
                    tracing::warn!(peer = %r.remote, "removing a closed connection's IPsec state: {e}");
                }
            }
        }
        if self.stale.as_ref().is_some_and(|(_, until)| *until <= now)
            && let Some((stale, _)) = self.stale.take()
        {
            let removed = self.remove_stale(&stale);
            if removed > 0 {
                tracing::info!("removed {removed} XFRM entries an earlier run of weft left");
            }
        }
    }

    /// Installs the block policy and each live outbound policy again (a no-op when
    /// they are there): someone flushing XFRM policies opens a window of at most
    /// [`REASSERT_INTERVAL`] in which marked frames could leave unencrypted.
    fn reassert(&mut self) {
        if let Err(e) = self.xfrm.ensure_block_policy() {
            tracing::warn!("installing the XFRM block policy again: {e}");
        }
        for (remote, spi) in &self.outbound {
            if let Err(e) = self.xfrm.set_policy(self.local, *remote, *spi) {
                tracing::warn!(peer = %remote, "installing an outbound policy again: {e}");
            }
        }
    }

    /// Removes an earlier run's SAs, and its policies unless a connection of this run
    /// has pointed them at its own SA since.
    fn remove_stale(&mut self, stale: &OwnState) -> usize {
        let mut removed = 0;
        for policy in stale.policies.iter().filter(|p| !p.block) {
            match self.xfrm.delete_policy(policy.src, policy.dst, policy.spi) {
                Ok(deleted) => removed += usize::from(deleted),
                Err(e) => tracing::warn!("removing an earlier run's policy: {e}"),
            }
        }
        for sa in &stale.sas {
            match self.xfrm.delete_sa(sa.src, sa.dst, sa.spi) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("removing an earlier run's SA: {e}"),
            }
        }
        removed
    }
}
