//! Reauthorization emails: SMTP via lettre, templates, and the outbox dispatcher.
//!
//! Alerting reads only the store: the outbox rows are written with the transition that
//! causes them, so a dead SMTP server can neither block probes nor lose an email.

pub mod dispatch;
pub mod templates;

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use crate::config::{EmailConfig, SmtpSecurity};
use templates::Rendered;

/// Sends rendered emails over SMTP.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
}

/// The mailer could not be set up (our configuration's fault).
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    /// `[email] from` is not a mailbox.
    #[error("email.from: {0}")]
    From(String),
    /// The SMTP password could not be read.
    #[error("email.password: {0}")]
    Password(#[from] crate::config::SecretError),
    /// The CA file or TLS settings are unusable.
    #[error("email TLS settings: {0}")]
    Tls(String),
}

/// Why one email was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFailure {
    /// A 5xx answer: retrying will not help.
    pub permanent: bool,
    pub message: String,
}

impl Mailer {
    pub fn new(config: &EmailConfig) -> Result<Mailer, MailerError> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|error: lettre::address::AddressError| MailerError::From(error.to_string()))?;
        let mut tls = TlsParameters::builder(config.host.clone());
        if let Some(file) = &config.ca_file {
            let pem = std::fs::read(file).map_err(|error| MailerError::Tls(error.to_string()))?;
            let certificate =
                Certificate::from_pem(&pem).map_err(|error| MailerError::Tls(error.to_string()))?;
            tls = tls.add_root_certificate(certificate);
        }
        let parameters = tls
            .build()
            .map_err(|error| MailerError::Tls(error.to_string()))?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .timeout(Some(config.timeout))
            .pool_config(PoolConfig::new().max_size(4));
        builder = match config.security {
            SmtpSecurity::Implicit => builder.tls(Tls::Wrapper(parameters)),
            SmtpSecurity::StartTlsRequired => builder.tls(Tls::Required(parameters)),
            SmtpSecurity::StartTlsOpportunistic => builder.tls(Tls::Opportunistic(parameters)),
            SmtpSecurity::None => builder.tls(Tls::None),
        };
        if let (Some(username), Some(password)) = (&config.username, &config.password) {
            let password = password.read()?;
            builder = builder.credentials(Credentials::new(
                username.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        Ok(Mailer {
            transport: builder.build(),
            from,
            timeout: config.timeout,
        })
    }

    /// Sends one email with a fixed Message-ID (so a resend is recognisable as the same).
    pub async fn send(
        &self,
        to: &str,
        message_id: &str,
        rendered: &Rendered,
    ) -> Result<(), SendFailure> {
        let recipient: Mailbox = to.parse().map_err(|_| SendFailure {
            permanent: true,
            message: format!("{to:?} is not an address"),
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(recipient)
            .subject(rendered.subject.clone())
            .message_id(Some(message_id.to_owned()))
            .multipart(MultiPart::alternative_plain_html(
                rendered.text.clone(),
                rendered.html.clone(),
            ))
            .map_err(|error| SendFailure {
                permanent: true,
                message: format!("cannot build the message: {error}"),
            })?;
        // A pooled connection the server closed fails once: one immediate retry.
        let mut last = None;
        for _ in 0..2 {
            match tokio::time::timeout(self.timeout, self.transport.send(message.clone())).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) if error.is_permanent() => {
                    return Err(SendFailure {
                        permanent: true,
                        message: crate::domain::bounded(&error.to_string(), 300),
                    });
                }
                Ok(Err(error)) => {
                    last = Some(crate::domain::bounded(&error.to_string(), 300));
                }
                Err(_) => last = Some("SMTP server did not answer within the timeout".to_owned()),
            }
        }
        Err(SendFailure {
            permanent: false,
            message: last.unwrap_or_default(),
        })
    }
}
