//! Mutual TLS between the roles: who a peer is, and what it may call.
//!
//! Every internal connection (router → expert node, expert node and router → coordinator,
//! coordinator → coordinator, the CLI's admin calls) is TLS where both ends present a
//! certificate signed by the cluster's CA. A certificate's role is a DNS subject alternative
//! name, `ROLE.switchyard` ([`Role::domain`]): a client connecting to an expert node accepts
//! only a certificate valid for `expert-node.switchyard`, and a server reads the caller's role
//! the same way and checks it against what the call needs ([`Security::authorize`]). `switchyard
//! tls` and `switchyard up` issue such certificates; an operator's own PKI can too.
//!
//! Plaintext exists only behind `--insecure-plaintext`: then nothing is authenticated.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// What a certificate lets its holder be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A member of the coordinator group: steps raft, forwards calls to the leader.
    Coordinator,
    /// An expert node: registers and heartbeats (as itself), follows the placement.
    Node,
    /// A router: dispatches to expert nodes, reports load, drains a node whose answers it refused.
    Router,
    /// An operator: drains nodes and changes the coordinator group's members.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Coordinator, Role::Node, Role::Router, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "expert-node",
            Role::Router => "router",
            Role::Admin => "admin",
        }
    }

    /// The DNS name a certificate of this role is valid for.
    pub fn domain(self) -> String {
        format!("{}.{DOMAIN}", self.name())
    }

    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The parent domain of every role's name.
pub const DOMAIN: &str = "switchyard";

/// How long a TLS handshake may take before the connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS flags every role (and the admin CLI) takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsFlags {
    /// PEM certificate of the cluster's CA: peers must present a certificate it signed
    /// (`switchyard tls ca` makes one; `switchyard up` makes its own).
    #[arg(long = "tls-ca", env = "SWITCHYARD_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// PEM certificate this process presents, signed by the CA, valid for its role
    /// (`switchyard tls issue --role ROLE`).
    #[arg(long = "tls-cert", env = "SWITCHYARD_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long = "tls-key", env = "SWITCHYARD_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// Internal connections without TLS: neither encrypted nor authenticated, so any process
    /// that reaches a port may call anything on it. Only for a network nothing else reaches.
    #[arg(long = "insecure-plaintext", env = "SWITCHYARD_INSECURE_PLAINTEXT", conflicts_with_all = ["ca", "cert", "key"])]
    pub insecure_plaintext: bool,
}

impl TlsFlags {
    /// Flags for plaintext (tests, and processes that make no internal connection).
    pub fn plaintext() -> Self {
        TlsFlags { insecure_plaintext: true, ..TlsFlags::default() }
    }

    /// Flags naming a CA, a certificate and its key.
    pub fn files(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsFlags { ca: Some(ca.into()), cert: Some(cert.into()), key: Some(key.into()), insecure_plaintext: false }
    }

    /// Reads the files and checks that the certificate is one of `role`'s; with
    /// `--insecure-plaintext`, warns that nothing is authenticated.
    pub fn load(&self, role: Role) -> Result<Security, String> {
        if self.insecure_plaintext {
            tracing::warn!(
                "--insecure-plaintext: this {role}'s internal connections are neither encrypted nor authenticated; \
                 any process that reaches its ports may call anything on them"
            );
            return Ok(Security::Plaintext);
        }
        let (ca, cert, key) = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            (None, None, None) => {
                return Err(format!(
                    "internal connections need mutual TLS: give --tls-ca, --tls-cert and --tls-key (a {role} \
                     certificate; `switchyard tls` makes them), or --insecure-plaintext on a network nothing else reaches"
                ));
            }
            _ => {
                let missing: Vec<&str> = [("--tls-ca", &self.ca), ("--tls-cert", &self.cert), ("--tls-key", &self.key)]
                    .into_iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(f, _)| f)
                    .collect();
                return Err(format!(
                    "mutual TLS needs --tls-ca, --tls-cert and --tls-key: {} missing",
                    missing.join(", ")
                ));
            }
        };
        let ca_pem = read(ca, "--tls-ca")?;
        let cert_pem = read(cert, "--tls-cert")?;
        let key_pem = read(key, "--tls-key")?;
        let ders = certificates(&cert_pem).map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        let leaf = ders.first().ok_or_else(|| format!("--tls-cert {} holds no certificate", cert.display()))?;
        let roles = Roles::of(leaf).map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        if !roles.contains(role) {
            return Err(format!(
                "--tls-cert {} is not a certificate of role {role}: it is not valid for {} (it is for: {roles})",
                cert.display(),
                role.domain()
            ));
        }
        if certificates(&ca_pem).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?.is_empty() {
            return Err(format!("--tls-ca {} holds no certificate", ca.display()));
        }
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
            return Err(format!("--tls-key {} holds no PEM private key", key.display()));
        }
        Ok(Security::Mutual(Arc::new(Mutual {
            role,
            ca: Certificate::from_pem(ca_pem),
            identity: Identity::from_pem(cert_pem, key_pem),
        })))
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// The DER certificates in a PEM file.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("not PEM certificates: {e}"))
}

/// How this process's internal connections are secured.
#[derive(Clone)]
pub enum Security {
    /// `--insecure-plaintext`: nothing is encrypted or authenticated.
    Plaintext,
    Mutual(Arc<Mutual>),
}

pub struct Mutual {
    role: Role,
    ca: Certificate,
    identity: Identity,
}

/// Who made a call, as far as its connection proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Plaintext: anyone.
    Unauthenticated,
    /// A certificate signed by the cluster's CA.
    Certified {
        roles: Roles,
        /// SHA-256 of the certificate, hex: the identity a node's registration is bound to.
        fingerprint: String,
    },
}

impl Caller {
    /// The certificate's fingerprint (`None` in plaintext).
    pub fn fingerprint(&self) -> Option<&str> {
        match self {
            Caller::Unauthenticated => None,
            Caller::Certified { fingerprint, .. } => Some(fingerprint),
        }
    }

    pub fn is(&self, role: Role) -> bool {
        matches!(self, Caller::Certified { roles, .. } if roles.contains(role))
    }
}

impl Security {
    pub fn is_plaintext(&self) -> bool {
        matches!(self, Security::Plaintext)
    }

    /// The role this process's certificate holds (`None` in plaintext).
    pub fn role(&self) -> Option<Role> {
        match self {
            Security::Plaintext => None,
            Security::Mutual(m) => Some(m.role),
        }
    }

    /// An endpoint for `address` (`host:port`) whose server must present a `peer` certificate.
    pub fn endpoint(&self, address: &str, peer: Role) -> Result<Endpoint, String> {
        match self {
            Security::Plaintext => Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| format!("invalid address {address:?}: {e}")),
            Security::Mutual(m) => {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(m.ca.clone())
                    .identity(m.identity.clone())
                    .domain_name(peer.domain())
                    .timeout(HANDSHAKE_TIMEOUT);
                Endpoint::from_shared(format!("https://{address}"))
                    .map_err(|e| format!("invalid address {address:?}: {e}"))?
                    .tls_config(tls)
                    .map_err(|e| format!("TLS for {address}: {e}"))
            }
        }
    }

    /// `server` with TLS that requires a client certificate signed by the CA.
    pub fn server(&self, server: tonic::transport::Server) -> Result<tonic::transport::Server, String> {
        match self {
            Security::Plaintext => Ok(server),
            Security::Mutual(m) => {
                let tls = ServerTlsConfig::new()
                    .identity(m.identity.clone())
                    .client_ca_root(m.ca.clone())
                    .timeout(HANDSHAKE_TIMEOUT);
                server.tls_config(tls).map_err(|e| format!("TLS server configuration: {e}"))
            }
        }
    }

    /// Who made `request`: its TLS peer's certificate (any CA-signed one was accepted by the
    /// handshake), or [`Caller::Unauthenticated`] in plaintext.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if self.is_plaintext() {
            return Ok(Caller::Unauthenticated);
        }
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("the call came without a client certificate"))?;
        let leaf =
            certs.first().ok_or_else(|| Status::unauthenticated("the call came without a client certificate"))?;
        let roles =
            Roles::of(leaf).map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
        Ok(Caller::Certified { roles, fingerprint: fingerprint(leaf) })
    }

    /// The caller of `request` if it holds one of `allowed` (anyone in plaintext); else
    /// `PERMISSION_DENIED` naming the call, the roles it needs and the roles the caller has.
    pub fn authorize<T>(&self, request: &Request<T>, call: &str, allowed: &[Role]) -> Result<Caller, Status> {
        let caller = self.caller(request)?;
        check(&caller, call, allowed)?;
        Ok(caller)
    }
}

/// Whether `caller` may make `call`, which needs one of `allowed`.
pub fn check(caller: &Caller, call: &str, allowed: &[Role]) -> Result<(), Status> {
    match caller {
        Caller::Unauthenticated => Ok(()),
        Caller::Certified { roles, .. } if allowed.iter().any(|&r| roles.contains(r)) => Ok(()),
        Caller::Certified { roles, .. } => {
            let needed: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
            Err(Status::permission_denied(format!(
                "`{call}` needs a certificate of role {}; the caller's is for: {roles}",
                needed.join(" or ")
            )))
        }
    }
}

/// SHA-256 of a certificate's DER, hex.
pub fn fingerprint(cert: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(cert).iter().map(|b| format!("{b:02x}")).collect()
}

/// The roles a certificate is valid for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    /// The roles whose [`Role::domain`] `cert` names.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Roles, String> {
        let parsed = webpki::EndEntityCert::try_from(cert).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let mut roles = Roles::default();
        for role in Role::ALL {
            let name = ServerName::try_from(role.domain()).expect("role domains are DNS names");
            if parsed.verify_is_valid_for_subject_name(&name).is_ok() {
                roles.0 |= 1 << role as u8;
            }
        }
        Ok(roles)
    }

    pub fn only(role: Role) -> Roles {
        Roles(1 << role as u8)
    }

    /// As a number (for metadata), and back; unknown bits are dropped.
    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn from_bits(bits: u8) -> Roles {
        Roles(bits & ((1 << Role::ALL.len()) - 1))
    }

    pub fn contains(self, role: Role) -> bool {
        self.0 & (1 << role as u8) != 0
    }
}

impl std::fmt::Display for Roles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Role::ALL.into_iter().filter(|&r| self.contains(r)).map(Role::name).collect();
        if names.is_empty() { f.write_str("no Switchyard role") } else { f.write_str(&names.join(", ")) }
    }
}
