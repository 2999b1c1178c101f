//! A minimal SMTP sink on loopback for the demo: accepts every message and keeps it, so
//! the tour can print the email a customer would receive. (Tests use a real SMTP server.)

use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One captured email.
#[derive(Debug, Clone)]
pub struct Captured {
    pub to: Vec<String>,
    pub raw: String,
}

impl Captured {
    /// A header, with RFC 2047 encoded words decoded.
    pub fn header(&self, name: &str) -> String {
        let head = self.raw.split("\r\n\r\n").next().unwrap_or_default();
        let mut value = String::new();
        let mut inside = false;
        for line in head.split("\r\n") {
            if inside && (line.starts_with(' ') || line.starts_with('\t')) {
                // Unfolding keeps the whitespace: it separates words.
                value.push_str(line);
                continue;
            }
            inside = false;
            if let Some((key, rest)) = line.split_once(':')
                && key.eq_ignore_ascii_case(name)
            {
                value = rest.trim().to_owned();
                inside = true;
            }
        }
        decode_words(&value)
    }

    /// The decoded `text/plain` part.
    pub fn text(&self) -> String {
        for part in self.raw.split("\r\n--") {
            let Some((head, body)) = part.split_once("\r\n\r\n") else {
                continue;
            };
            let lower = head.to_ascii_lowercase();
            if !lower.contains("text/plain") {
                continue;
            }
            let body = body.trim_end_matches("--").trim_end();
            if lower.contains("base64") {
                let joined: String = body.split_whitespace().collect();
                return base64::engine::general_purpose::STANDARD
                    .decode(joined)
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_default();
            }
            if lower.contains("quoted-printable") {
                return decode_quoted_printable(body);
            }
            return body.to_owned();
        }
        String::new()
    }
}

/// The sink: its port and what it received.
#[derive(Clone)]
pub struct Mailbox {
    pub port: u16,
    messages: Arc<Mutex<Vec<Captured>>>,
}

impl Mailbox {
    pub async fn start() -> std::io::Result<Mailbox> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(session(stream, sink.clone()));
            }
        });
        Ok(Mailbox { port, messages })
    }

    pub fn messages(&self) -> Vec<Captured> {
        self.messages.lock().expect("mailbox").clone()
    }
}

async fn session(
    stream: tokio::net::TcpStream,
    sink: Arc<Mutex<Vec<Captured>>>,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader);
    writer
        .write_all(b"220 demo.localhost connwatch demo mailbox\r\n")
        .await?;
    let mut recipients = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        if command.starts_with("EHLO") || command.starts_with("HELO") {
            writer
                .write_all(b"250-demo.localhost\r\n250 8BITMIME\r\n")
                .await?;
        } else if command.starts_with("RCPT TO:") {
            let address = line.trim_end()[8..]
                .trim()
                .trim_matches(['<', '>'])
                .to_owned();
            recipients.push(address);
            writer.write_all(b"250 OK\r\n").await?;
        } else if command.starts_with("DATA") {
            writer.write_all(b"354 go ahead\r\n").await?;
            let mut raw = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                raw.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            sink.lock().expect("mailbox").push(Captured {
                to: std::mem::take(&mut recipients),
                raw,
            });
            writer.write_all(b"250 accepted\r\n").await?;
        } else if command.starts_with("QUIT") {
            writer.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            // MAIL FROM, RSET, NOOP and the rest.
            writer.write_all(b"250 OK\r\n").await?;
        }
    }
}

fn decode_quoted_printable(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'='
            && index + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&joined[index + 1..index + 3], 16)
        {
            out.push(byte);
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).replace("\r\n", "\n")
}

fn decode_words(text: &str) -> String {
    let mut out = String::new();
    for word in text.split_whitespace() {
        let lower = word.to_ascii_lowercase();
        let decoded = if lower.starts_with("=?utf-8?b?") && word.ends_with("?=") {
            base64::engine::general_purpose::STANDARD
                .decode(&word[10..word.len() - 2])
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .ok()
        } else if lower.starts_with("=?utf-8?q?") && word.ends_with("?=") {
            Some(decode_quoted_printable(
                &word[10..word.len() - 2].replace('_', " "),
            ))
        } else {
            None
        };
        match decoded {
            Some(decoded) => out.push_str(&decoded),
            None => {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(word);
                out.push(' ');
            }
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
