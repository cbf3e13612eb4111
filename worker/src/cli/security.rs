//! The flags (and environment variables) a client of the coordinator uses to reach one that
//! asks for a bearer token or TLS (`[security]` in the job file).

use std::path::PathBuf;

use braid_coordinator::security::ClientSecurity;
use clap::Args;

/// How to reach a coordinator that asks for a token or TLS.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientSecurityArgs {
    /// A file holding the coordinator's bearer token; without it the token comes from the
    /// BRAID_AUTH_TOKEN environment variable, when set.
    #[arg(long, env = "BRAID_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// PEM CA certificate that signed the coordinator's TLS certificate; turns TLS on.
    #[arg(long, env = "BRAID_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that checks client certificates.
    #[arg(long, env = "BRAID_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "BRAID_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the host of the address).
    #[arg(long, env = "BRAID_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl ClientSecurityArgs {
    /// Reads the token and certificates the flags name.
    pub fn load(&self) -> anyhow::Result<ClientSecurity> {
        let cert_and_key = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        Ok(ClientSecurity::load(self.auth_token_file.as_deref(), self.tls_ca.as_deref(), cert_and_key, self.tls_domain.as_deref())?)
    }
}
