//! A minimal HTTP/1.1 client for the agents' admin, metrics and readiness endpoints, run inside
//! a place's network namespace (those endpoints are per node).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::Place;

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
