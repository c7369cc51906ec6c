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
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use weft::ipsec::{IpsecAction, IpsecSession, NONCE_LEN, SA_INIT_LEN};

use crate::xfrm::{EspUnavailable, OwnState, SaDirection, SaParams, Xfrm, errno};

/// What carrying out a session's actions produced.
#[derive(Default)]
pub struct Outcome {
    /// CryptoInitSARemote bodies to send to the peer over the control connection.
    pub send: Vec<[u8; SA_INIT_LEN]>,
    /// The first error, for the log and the connection's status.
    pub error: Option<String>,
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
}

impl Esp {
    /// Opens XFRM netlink, installs the block policy and checks that the kernel can do
    /// ESP with `rfc4106(gcm(aes))`. An earlier run's state is kept for `linger`.
    pub fn start(local: Ipv4Addr, linger: Duration, now: Instant) -> Result<Self, EspUnavailable> {
        let unavailable = |what: &str, e: std::io::Error| EspUnavailable {
            reason: format!("{what}: {e}"),
            errno: errno(&e),
        };
        let xfrm = Xfrm::open().map_err(|e| unavailable("opening XFRM netlink", e))?;
        // The leak guard before anything else: an earlier run's marked traffic keeps
        // flowing through its SAs, or is dropped, never sent in clear.
        xfrm.ensure_block_policy()
            .map_err(|e| unavailable("installing the XFRM block policy", e))?;
        xfrm.esp_support()?;
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
        })
    }

    /// Removes every XFRM state and policy of weft (encryption is off).
    pub fn remove_all() {
        match Xfrm::open().and_then(|x| x.remove_own(false)) {
            Ok(0) => {}
            Ok(n) => tracing::info!("encryption is off: removed {n} XFRM entries of weft"),
            Err(e) => tracing::debug!("removing weft's XFRM state: {e}"),
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
                                queue.extend(session.on_install_failed(spi, now));
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
                    self.xfrm
                        .install_sa(&sa)
                        .and_then(|()| self.xfrm.set_policy(self.local, remote, spi))
                        .map_err(|e| {
                            queue.extend(session.on_outbound_failed(spi));
                            format!("installing the outbound SA and policy: {e}")
                        })
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
    fn delete(&self, src: Ipv4Addr, dst: Ipv4Addr, spi: u32) -> Result<(), String> {
        if src == self.local {
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

    /// Removes what is due: retired connections' state, an earlier run's state.
    pub fn poll(&mut self, now: Instant) {
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
