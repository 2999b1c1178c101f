//! A real SMTP server process (aiosmtpd) for the email tests, and a test CA for STARTTLS.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One message as the server stored it.
#[derive(Debug, Clone)]
pub struct Received {
    pub to: Vec<String>,
    pub tls: bool,
    pub raw: String,
}

impl Received {
    /// A header's value (first occurrence, unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.raw.split("\r\n\r\n").next().unwrap_or_default();
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(current) = value.as_mut() {
                if line.starts_with(' ') || line.starts_with('\t') {
                    current.push_str(line);
                    continue;
                }
                break;
            }
            if let Some((key, rest)) = line.split_once(':')
                && key.eq_ignore_ascii_case(name)
            {
                value = Some(rest.trim().to_owned());
            }
        }
        value
    }

    /// The decoded subject (lettre encodes non-ASCII subjects).
    pub fn subject(&self) -> String {
        decode_words(&self.header("Subject").unwrap_or_default())
    }

    /// The message body with quoted-printable soft breaks undone.
    pub fn body(&self) -> String {
        let body = self
            .raw
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .unwrap_or_default();
        decode_quoted_printable(body)
    }
}

/// A running aiosmtpd server; stops when dropped.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    pub folder: PathBuf,
}

pub struct SmtpOptions<'a> {
    pub port: Option<u16>,
    pub tls: Option<(&'a Path, &'a Path)>,
    pub reject: &'a [&'a str],
    pub delay_secs: f64,
    /// The first `refuse` messages are refused (not stored) with `refuse_codes` in turn
    /// (451 unless given; 421 also closes the connection); then every one is accepted.
    pub refuse: u32,
    pub refuse_codes: &'a [u16],
}

impl Default for SmtpOptions<'_> {
    fn default() -> Self {
        SmtpOptions {
            port: None,
            tls: None,
            reject: &[],
            delay_secs: 0.0,
            refuse: 0,
            refuse_codes: &[],
        }
    }
}

impl SmtpServer {
    pub fn start(folder: &Path, options: SmtpOptions<'_>) -> SmtpServer {
        let port = options.port.unwrap_or_else(free_port);
        std::fs::create_dir_all(folder).expect("mail folder");
        let mut command = Command::new("/usr/bin/python3");
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/smtp_server.py"
            ))
            .args(["--port", &port.to_string(), "--out"])
            .arg(folder)
            .args([
                "--delay",
                &options.delay_secs.to_string(),
                "--lifetime",
                "300",
            ]);
        for address in options.reject {
            command.args(["--reject", address]);
        }
        command.args(["--refuse", &options.refuse.to_string()]);
        for code in options.refuse_codes {
            command.args(["--refuse-code", &code.to_string()]);
        }
        if let Some((cert, key)) = options.tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3-aiosmtpd (apt-get install python3-aiosmtpd)");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("read");
        assert_eq!(ready.trim(), "ready", "the SMTP server did not start");
        SmtpServer {
            child,
            port,
            folder: folder.to_owned(),
        }
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        read_messages(&self.folder)
    }

    /// The messages refused so far: (code, recipients), oldest first.
    pub fn refused(&self) -> Vec<(u16, String)> {
        std::fs::read_to_string(self.folder.join("refused.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (code, recipients) = line.split_once(' ')?;
                Some((code.parse().ok()?, recipients.to_owned()))
            })
            .collect()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read_messages(folder: &Path) -> Vec<Received> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .collect()
        })
        .unwrap_or_default();
    names.retain(|path| path.extension().is_some_and(|extension| extension == "eml"));
    names.sort();
    names
        .into_iter()
        .filter_map(|path| {
            let text = std::fs::read_to_string(path).ok()?;
            let (meta, raw) = text.split_once('\n')?;
            let meta: serde_json::Value = serde_json::from_str(meta).ok()?;
            Some(Received {
                to: meta["to"]
                    .as_array()?
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                tls: meta["tls"].as_bool().unwrap_or(false),
                raw: raw.to_owned(),
            })
        })
        .collect()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// A test CA and a leaf certificate for 127.0.0.1 signed by it: (ca.pem, leaf.pem, leaf.key).
pub fn test_ca(folder: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(folder)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    std::fs::write(
        folder.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=connwatch test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    (
        folder.join("ca.pem"),
        folder.join("leaf.pem"),
        folder.join("leaf.key"),
    )
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
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes RFC 2047 `=?utf-8?b?…?=` words (what lettre writes for non-ASCII subjects).
fn decode_words(text: &str) -> String {
    use base64::Engine;
    text.split_whitespace()
        .map(|word| {
            let lower = word.to_ascii_lowercase();
            if lower.starts_with("=?utf-8?b?") && word.ends_with("?=") {
                let encoded = &word[10..word.len() - 2];
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .unwrap_or_else(|_| word.to_owned())
            } else if lower.starts_with("=?utf-8?q?") && word.ends_with("?=") {
                decode_quoted_printable(&word[10..word.len() - 2].replace('_', " "))
            } else {
                format!(" {word} ")
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
