//! A connection that is plain TCP or TLS (rustls) over either I/O driver.
//!
//! rustls runs in its buffered mode over owned buffers: ciphertext is read into `cipher_in`
//! with the same append-read as plaintext, fed to rustls, and plaintext is appended to the
//! caller's buffer. That costs one copy each way compared with plaintext (RUNTIME.md measured
//! the unbuffered API as the way to remove it; a later optimisation).
//!
//! The TLS role is fixed when TLS starts and never changes: after ATRN the provider becomes
//! the SMTP client but stays the TLS server (PROTOCOL.md §2, RFC 3207 notes), so the same
//! `Conn` simply carries on.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::io::Stream;

/// Size of one ciphertext read. A TLS record is at most 16 KiB plus overhead.
const CIPHER_READ: usize = 18 * 1024;

/// Plain or TLS byte stream with owned-buffer reads and writes.
pub struct Conn {
    stream: Stream,
    tls: Option<Box<rustls::Connection>>,
    cipher_in: Vec<u8>,
    cipher_out: Vec<u8>,
    line_records: bool,
}

impl Conn {
    /// A plaintext connection.
    pub fn plain(stream: Stream) -> Conn {
        Conn {
            stream,
            tls: None,
            cipher_in: Vec::new(),
            cipher_out: Vec::new(),
            line_records: false,
        }
    }

    /// Under TLS, put every line in its own TLS record (still batched into few socket writes).
    ///
    /// For peers that relay the session line by line behind `select()`, as fetchmail's ODMR
    /// mode does over `--ssl`: a line that OpenSSL already decrypted and buffered is invisible
    /// to `select()`, so a record holding several lines stalls the relay after the first one.
    /// Costs about 22 bytes per line; off by default.
    pub fn set_line_records(&mut self, on: bool) {
        self.line_records = on;
    }

    /// True once a TLS handshake has completed on this connection.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The negotiated TLS protocol version and cipher suite, for logs and Received: lines.
    pub fn tls_description(&self) -> Option<String> {
        let tls = self.tls.as_ref()?;
        let version = tls
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let suite = tls
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()));
        Some(format!("{version} {}", suite.unwrap_or_default()))
    }

    /// RFC 9266 `tls-exporter` channel binding (32 bytes), for SCRAM-SHA-256-PLUS. Only
    /// defined for TLS 1.3; `None` otherwise.
    pub fn channel_binding(&self) -> Option<[u8; 32]> {
        let tls = self.tls.as_ref()?;
        if tls.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return None;
        }
        tls.export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
            .ok()
    }

    /// The fingerprint ([`crate::tls::fingerprint`]) of the certificate the TLS peer presented
    /// and proved possession of, if any: the identity SASL EXTERNAL maps to an account.
    pub fn peer_fingerprint(&self) -> Option<String> {
        let leaf = self.tls.as_ref()?.peer_certificates()?.first()?;
        Some(crate::tls::fingerprint(leaf))
    }

    /// Runs a TLS handshake as the server (STARTTLS on our listeners, or implicit TLS).
    pub async fn start_tls_server(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        self.handshake(rustls::Connection::Server(conn)).await
    }

    /// Runs a TLS handshake as the client (test customers, the outbound relay).
    pub async fn start_tls_client(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> io::Result<()> {
        let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        self.handshake(rustls::Connection::Client(conn)).await
    }

    async fn handshake(&mut self, conn: rustls::Connection) -> io::Result<()> {
        self.tls = Some(Box::new(conn));
        loop {
            let tls = self.tls.as_mut().expect("set above");
            if !tls.is_handshaking() {
                break;
            }
            if tls.wants_write() {
                self.flush_tls().await?;
            } else if self.fill_tls().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during TLS handshake",
                ));
            }
        }
        // The final handshake flight (e.g. the server's session tickets) may still be queued.
        self.flush_tls().await
    }

    /// Appends at least one byte of plaintext to `out`; returns 0 when the peer closed.
    pub async fn read_append(&mut self, out: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.stream.read_append(out, want).await;
        }
        loop {
            let tls = self.tls.as_mut().expect("checked above");
            let start = out.len();
            out.resize(start + want, 0);
            let got = tls.reader().read(&mut out[start..]);
            match got {
                Ok(n) => {
                    out.truncate(start + n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => out.truncate(start),
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
            if tls.wants_write() {
                self.flush_tls().await?;
            }
            if self.fill_tls().await? == 0 {
                return Ok(0);
            }
        }
    }

    /// Reads ciphertext and feeds it to rustls. Returns the ciphertext bytes read (0 = EOF).
    async fn fill_tls(&mut self) -> io::Result<usize> {
        let n = if self.cipher_in.is_empty() {
            self.stream
                .read_append(&mut self.cipher_in, CIPHER_READ)
                .await?
        } else {
            // Left over from a feed that rustls refused because its plaintext buffer was full.
            self.cipher_in.len()
        };
        if n == 0 {
            return Ok(0);
        }
        let tls = self.tls.as_mut().expect("fill_tls only with TLS");
        let mut rd = &self.cipher_in[..];
        while !rd.is_empty() {
            // read_tls refuses more input while rustls holds undelivered plaintext; stop and
            // keep the rest in cipher_in, the caller drains the plaintext first.
            match tls.read_tls(&mut rd) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Err(e) = tls.process_new_packets() {
                // Let the peer learn why (rustls queued an alert), then fail.
                let _ = self.flush_tls().await;
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        let consumed = self.cipher_in.len() - rd.len();
        self.cipher_in.drain(..consumed);
        Ok(n)
    }

    /// Writes everything rustls has queued.
    async fn flush_tls(&mut self) -> io::Result<()> {
        loop {
            let tls = self.tls.as_mut().expect("flush_tls only with TLS");
            if !tls.wants_write() {
                return Ok(());
            }
            self.cipher_out.clear();
            while tls.wants_write() {
                tls.write_tls(&mut self.cipher_out)?;
            }
            let (res, buf) = self
                .stream
                .write_all_owned(std::mem::take(&mut self.cipher_out))
                .await;
            self.cipher_out = buf;
            res?;
        }
    }

    /// Writes all of `buf` (encrypting under TLS) and hands the buffer back.
    pub async fn write_owned(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        if self.tls.is_none() {
            return self.stream.write_all_owned(buf).await;
        }
        let res = self.write_tls(&buf).await;
        (res, buf)
    }

    /// Encrypts `data` and sends it. rustls accepts only a bounded amount of plaintext
    /// before its records are written out (64 KiB by default), so this alternates between
    /// handing it plaintext and flushing the records to the socket.
    async fn write_tls(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.line_records {
            return self.write_tls_records(data).await;
        }
        for line in data.split_inclusive(|b| *b == b'\n') {
            // Each write call becomes its own record(s); flush when rustls is full.
            let mut rest = line;
            while !rest.is_empty() {
                let tls = self.tls.as_mut().expect("write_tls only with TLS");
                let n = tls.writer().write(rest)?;
                rest = &rest[n..];
                if n == 0 {
                    self.flush_tls().await?;
                }
            }
        }
        self.flush_tls().await
    }

    async fn write_tls_records(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let tls = self.tls.as_mut().expect("write_tls only with TLS");
            let n = tls.writer().write(data)?;
            data = &data[n..];
            if n == 0 || tls.wants_write() {
                self.flush_tls().await?;
            }
        }
        self.flush_tls().await
    }

    /// Writes and empties `buf` (a protocol machine's output), keeping its allocation for the
    /// next replies. Does nothing when it is empty.
    pub async fn flush_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (res, mut out) = self.write_owned(std::mem::take(buf)).await;
        out.clear();
        *buf = out;
        res
    }

    /// Sends TLS close_notify (if TLS) and half-closes the socket.
    pub async fn close(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            let _ = self.flush_tls().await;
        }
        self.stream.shutdown_write();
    }
}
