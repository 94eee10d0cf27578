//! A tcpdump that prints TCP payloads as text, to prove what crossed a link in plaintext.

use std::time::Duration;

use mesh_testbed::{Background, Place};

/// A running capture on one interface of one place (the fabric's bridge, a pod's links).
pub struct Sniffer(Background);

impl Sniffer {
    /// Starts capturing TCP on `iface` in `place`, and gives tcpdump time to attach.
    pub fn start(place: &Place, iface: &str) -> Sniffer {
        Self::start_filtered(place, iface, "tcp")
    }

    /// [`Sniffer::start`] with a capture filter of one's own, e.g. everything but HBONE when
    /// the mesh itself is busy.
    pub fn start_filtered(place: &Place, iface: &str, filter: &str) -> Sniffer {
        let bg = place
            .spawn(
                "tcpdump",
                &["-i", iface, "-n", "-l", "-A", "-s", "0", filter],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        Sniffer(bg)
    }

    /// Lets the last packets arrive, stops the capture and returns everything it printed.
    pub fn stop(self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        String::from_utf8_lossy(&self.0.kill().unwrap().stdout).into_owned()
    }
}
