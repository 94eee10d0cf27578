//! The running agent's side of a handover to a successor (see `capture::handover`): polled from
//! the main loop and, after SIGTERM, while draining — a rollout may stop the old pod before the
//! new agent is ready.
use std::sync::Arc;

use tracing::{info, warn};

use super::handler::HandlerContext;
use crate::{
    admin::{AdminAddrs, AdminEndpoints, AdminState},
    capture::{CaptureController, handover::Successor},
    metrics::Metrics,
};

pub(super) struct Succession {
    /// None while closed for a starting successor (it binds the same ports).
    endpoints: Option<AdminEndpoints>,
    admin: Arc<AdminState>,
    addrs: AdminAddrs,
    /// Handed over, peers not yet told GOAWAY: waiting for the successor's listeners.
    goaway_pending: bool,
}

impl Succession {
    pub(super) fn new(
        endpoints: AdminEndpoints,
        admin: Arc<AdminState>,
        addrs: AdminAddrs,
    ) -> Self {
        Self {
            endpoints: Some(endpoints),
            admin,
            addrs,
            goaway_pending: false,
        }
    }

    /// One look at the successor's progress, acting on it.
    pub(super) fn poll(
        &mut self,
        controller: &mut CaptureController,
        ctx: &HandlerContext,
        metrics: &Metrics,
    ) {
        if !controller.owns_data_path() {
            // Handed over already. Once the successor's listeners are registered (it lets go of
            // its announcement then; or it died), new connections reach it: peers open their
            // next streams on new connections. Told earlier, they would reach this agent again
            // and be told GOAWAY at once.
            if self.goaway_pending && controller.successor() == Successor::None {
                self.goaway_pending = false;
                if let Some(mesh) = &ctx.mesh {
                    mesh.server.goaway.fire();
                }
                info!(
                    "the successor serves new connections: HBONE peers told GOAWAY (their open streams finish here)"
                );
            }
            return;
        }
        match controller.successor() {
            Successor::None => {
                if self.endpoints.is_some() {
                    return;
                }
                match crate::admin::start(Arc::clone(&self.admin), self.addrs) {
                    Ok(e) => {
                        info!(
                            "the successor left before taking over: admin, metrics and readiness endpoints open again"
                        );
                        self.endpoints = Some(e);
                    }
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "the successor left, but the endpoints could not be opened again")
                    }
                }
            }
            Successor::Starting => {
                if let Some(mut e) = self.endpoints.take() {
                    e.stop();
                    info!(
                        "a successor is starting: admin, metrics and readiness endpoints closed for it"
                    );
                }
            }
            Successor::Ready => {
                if let Some(mut e) = self.endpoints.take() {
                    e.stop();
                }
                controller.hand_over();
                self.goaway_pending = true;
                info!(
                    connections = metrics.traffic.in_flight(),
                    "a newer agent is taking over: data path handed over; serving this agent's connections until they end (exit on SIGTERM once they have, or at --drain-seconds)"
                );
            }
        }
    }
}
