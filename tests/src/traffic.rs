//! Real traffic between places with real clients (iperf3), used by tests, demo and benchmarks.
use std::{
    hash::Hasher as _,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::place::Place;

/// What an iperf3 client reported about one transfer.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// Bytes the client wrote (iperf3's server-side count can lag it on short runs).
    pub bytes_sent: u64,
    /// Bytes the server reported receiving (`-n` runs end when all were sent and received).
    pub bytes_received: u64,
    /// Client address as the client saw its own socket.
    pub local: IpAddr,
    /// Server address the client was connected to.
    pub remote: IpAddr,
}

/// Sends `bytes` from `client` to an iperf3 server started in `server` on `server_ip:port`. The
/// server serves exactly one client and exits.
pub fn iperf3_send(
    client: &Place,
    server: &Place,
    server_ip: IpAddr,
    port: u16,
    bytes: u64,
) -> Result<Transfer> {
    let port_arg = port.to_string();
    let mut srv = server.spawn("iperf3", &["-s", "-1", "-p", &port_arg])?;
    srv.wait_listening(port, Duration::from_secs(10))?;
    let out = client.run(
        "iperf3",
        &[
            "-c",
            &server_ip.to_string(),
            "-p",
            &port_arg,
            "-n",
            &bytes.to_string(),
            "-J",
        ],
    )?;
    let status = srv.wait(Duration::from_secs(10))?.status;
    if !status.success() {
        bail!("iperf3 server in {} exited with {status}", server.name);
    }
    parse_client_json(&out)
}

fn parse_client_json(text: &str) -> Result<Transfer> {
    let json: Value = serde_json::from_str(text).context("iperf3 -J output is not JSON")?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    let connected = &json["start"]["connected"][0];
    let addr = |key: &str| -> Result<IpAddr> {
        let text = connected[key]
            .as_str()
            .with_context(|| format!("iperf3 JSON has no start.connected[0].{key}"))?;
        // iperf3 prints IPv4 peers of dual-stack sockets as ::ffff:a.b.c.d
        let text = text.strip_prefix("::ffff:").unwrap_or(text);
        text.parse()
            .with_context(|| format!("{key} {text:?} is not an IP"))
    };
    Ok(Transfer {
        bytes_sent: json["end"]["sum_sent"]["bytes"]
            .as_u64()
            .context("iperf3 JSON has no end.sum_sent.bytes")?,
        bytes_received: json["end"]["sum_received"]["bytes"]
            .as_u64()
            .context("iperf3 JSON has no end.sum_received.bytes")?,
        local: addr("local_host")?,
        remote: addr("remote_host")?,
    })
}

/// Connects from `client`'s namespace with source address `src` (which must be configured there)
/// to `dst`, failing after `timeout`. Lets tests send from an address that is not the pod's own.
pub fn connect_from(
    client: &Place,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<io::Result<TcpStream>> {
    connect_from_port(client, SocketAddr::new(src, 0), dst, timeout)
}

/// [`connect_from`] from a given source port too (SO_REUSEADDR, so a port whose last connection
/// this side closed passively can be reused at once): how tests make 4-tuples collide.
pub fn connect_from_port(
    client: &Place,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<io::Result<TcpStream>> {
    client.in_netns(|| {
        let domain = socket2::Domain::for_address(dst);
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&src.into())?;
        socket.connect_timeout(&dst.into(), timeout)?;
        Ok(socket.into())
    })
}

/// The outcome of [`checked_send`], as the receiving side measured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedTransfer {
    pub bytes: u64,
    pub digest: u64,
    /// The client address the server's accepted socket reported.
    pub peer: SocketAddr,
}

/// Sends `bytes` of a deterministic pattern from a socket created in `client`'s namespace to a
/// listener created in `server`'s namespace, and returns what the server received: exact byte
/// count, digest and the peer address it saw. Compare with [`pattern_digest`].
pub fn checked_send(
    client: &Place,
    server: &Place,
    server_addr: SocketAddr,
    bytes: u64,
) -> Result<CheckedTransfer> {
    // A socket belongs to the namespace it was created in, whichever thread uses it later.
    let listener = server
        .in_netns(|| TcpListener::bind(server_addr))?
        .with_context(|| format!("binding {server_addr} in {}", server.name))?;
    // Nonblocking accept with a deadline: if the client never connects, the receiver thread (and
    // the listener, which pins the server's netns) must not outlive this call.
    listener.set_nonblocking(true)?;
    let receiver = thread::spawn(move || -> io::Result<CheckedTransfer> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let (mut conn, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no client connected",
                        ));
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        drop(listener);
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hasher = std::hash::DefaultHasher::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
            total += n as u64;
        }
        Ok(CheckedTransfer {
            bytes: total,
            digest: hasher.finish(),
            peer,
        })
    });
    let mut stream = client
        .in_netns(|| TcpStream::connect_timeout(&server_addr, Duration::from_secs(10)))?
        .with_context(|| format!("connecting from {} to {server_addr}", client.name))?;
    let mut remaining = bytes;
    let mut offset = 0u64;
    let mut chunk = vec![0u8; 64 << 10];
    while remaining > 0 {
        let n = remaining.min(chunk.len() as u64) as usize;
        fill_pattern(offset, &mut chunk[..n]);
        stream.write_all(&chunk[..n]).context("sending")?;
        remaining -= n as u64;
        offset += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
        .context("receiving")
}

/// The digest the receiver of [`checked_send`] must report for `bytes` intact bytes.
pub fn pattern_digest(bytes: u64) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    while offset < bytes {
        let n = (bytes - offset).min(chunk.len() as u64) as usize;
        fill_pattern(offset, &mut chunk[..n]);
        hasher.write(&chunk[..n]);
        offset += n as u64;
    }
    hasher.finish()
}

/// Byte `i` of the stream is a function of `i`, so reordering or loss changes the digest.
fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = (pos ^ (pos >> 8) ^ (pos >> 16).wrapping_mul(31)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_report_and_unmaps_v4_in_v6() {
        let t = parse_client_json(
            r#"{"start":{"connected":[{"local_host":"::ffff:10.240.1.11","remote_host":"10.240.2.11"}]},
                "end":{"sum_sent":{"bytes":1048576},"sum_received":{"bytes":1040000}}}"#,
        )
        .unwrap();
        assert_eq!((t.bytes_sent, t.bytes_received), (1 << 20, 1_040_000));
        assert_eq!(t.local.to_string(), "10.240.1.11");
        assert_eq!(t.remote.to_string(), "10.240.2.11");
    }

    #[test]
    fn reports_iperf3_errors() {
        let err = parse_client_json(r#"{"error":"unable to connect to server"}"#).unwrap_err();
        assert!(err.to_string().contains("unable to connect"), "{err}");
    }

    #[test]
    fn digest_does_not_depend_on_how_the_stream_is_chunked() {
        // DefaultHasher::write is not chunking-invariant in general; checked_send hashes the
        // receiver's reads, so verify our use of it is (it must be for the check to be sound).
        let mut a = std::hash::DefaultHasher::new();
        let mut data = vec![0u8; 200_000];
        fill_pattern(0, &mut data);
        a.write(&data);
        let mut b = std::hash::DefaultHasher::new();
        for piece in data.chunks(7_777) {
            b.write(piece);
        }
        assert_eq!(a.finish(), b.finish());
    }
}
