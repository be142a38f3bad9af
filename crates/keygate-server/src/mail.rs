//! Mail for the developer portal: email-verification, password-reset and invitation links.
//!
//! With `mail.smtp_url` set, messages go through that SMTP server (`smtps://` for TLS from the first
//! byte, `smtp://…?tls=required` for STARTTLS, plain `smtp://` only to a relay on a private network;
//! rustls with the system's roots). Unset, the *test mode*: the message, link included, is written to the
//! server log (target `keygate::mail`), so a portal runs locally without a mail server. The log line is
//! the message's only copy: run the test mode only where the log is as private as a mailbox.

use std::time::Duration;

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::state::DatabaseUrl;

/// Where mail goes.
pub enum Mailer {
    /// Written to the log (test mode).
    Log {
        from: Mailbox,
    },
    Smtp {
        from: Mailbox,
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        url: DatabaseUrl,
    },
    /// The settings do not make a mailer (checked when they are read, so only a server built another
    /// way gets here): every send fails with this reason, and nothing is logged in its place.
    Broken(String),
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mailer::Log { from } => write!(f, "Mailer::Log({from})"),
            Mailer::Smtp { from, url, .. } => write!(f, "Mailer::Smtp({from}, {url})"),
            Mailer::Broken(why) => write!(f, "Mailer::Broken({why})"),
        }
    }
}

impl Mailer {
    /// The mailer of the configuration: SMTP when a URL is set, else the test mode.
    pub fn new(smtp_url: Option<&DatabaseUrl>, from: &str) -> Result<Mailer, String> {
        let from: Mailbox =
            from.parse().map_err(|e| format!("mail.from {from:?} is not a mail address: {e}"))?;
        match smtp_url {
            None => Ok(Mailer::Log { from }),
            Some(url) => {
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose())
                    .map_err(|e| format!("mail.smtp_url {url}: {e}"))?
                    .timeout(Some(Duration::from_secs(15)))
                    .build();
                Ok(Mailer::Smtp { from, transport: Box::new(transport), url: url.clone() })
            }
        }
    }

    /// Is this the test mode (links in the log)?
    pub fn logs_only(&self) -> bool {
        matches!(self, Mailer::Log { .. })
    }

    /// Sends a plain-text message. An error says why (never the message, which holds a link).
    pub async fn send(&self, to: &str, subject: &str, body: &str) -> Result<(), String> {
        // A bare address only: a display name could carry a second address (`"a@x" <b@y>`).
        let address: lettre::Address =
            to.trim().parse().map_err(|_| "the address cannot receive mail".to_string())?;
        let to_box = Mailbox::new(None, address);
        match self {
            Mailer::Log { .. } => {
                tracing::info!(target: "keygate::mail", to, subject, body,
                    "mail (test mode: no mail.smtp_url is set, so it is written here instead of sent)");
                Ok(())
            }
            Mailer::Smtp { from, transport, .. } => {
                let message = Message::builder()
                    .from(from.clone())
                    .to(to_box)
                    .subject(subject)
                    .header(ContentType::TEXT_PLAIN)
                    .body(body.to_string())
                    .map_err(|e| format!("cannot build the message: {e}"))?;
                transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("the SMTP server refused it: {e}"))
            }
            Mailer::Broken(why) => Err(why.clone()),
        }
    }
}
