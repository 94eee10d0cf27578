//! HTTP from inside a place's network namespace: a minimal HTTP/1.1 client for the agents'
//! admin, metrics and readiness endpoints (those are per node), and curl run in a pod.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::{Place, Pod};

/// GET `path` from `addr` inside `place`'s namespace: (status line, body).
pub fn http_get(
    place: &Place,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(String, String)> {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    place
        .in_netns(move || -> std::io::Result<(String, String)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(request.as_bytes())?;
            let mut all = Vec::new();
            s.read_to_end(&mut all)?;
            let text = String::from_utf8_lossy(&all).into_owned();
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            Ok((
                head.lines().next().unwrap_or("").to_owned(),
                body.to_owned(),
            ))
        })
        .unwrap()
}

/// One curl answer: the status line's code, the head, the body and the total time.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
    pub secs: f64,
}

impl Answer {
    /// Which app answered: `mtb-probe http-app` bodies start with `<name> saw ...`.
    pub fn served_by(&self) -> &str {
        self.body.split_whitespace().next().unwrap_or("")
    }
}

/// `curl -i` from `pod` with extra arguments. A failed transfer is status 0, not an error, so
/// the caller states what it expected; only failing to run curl at all is an error.
pub fn curl(pod: &Pod, url: &str, extra: &[&str]) -> anyhow::Result<Answer> {
    let mut args = vec!["-sS", "-i", "-m", "8", "-w", "\n%{http_code} %{time_total}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = pod.place.output("curl", &args)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut tail = tail.split_whitespace();
    let status = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let secs = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
        secs,
    })
}
