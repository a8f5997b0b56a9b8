//! `switchyard tls`: a cluster's certificate authority and the certificates it issues to
//! the roles. A certificate is valid for `ROLE.switchyard` (what peers check, see
//! `switchyard_proto::tls`) and `NAME.ROLE.switchyard` (which instance it is, for logs and
//! for an operator's own records). `switchyard up` uses the same code for its clusters.
//!
//! Files: `DIR/ca.pem` and `DIR/ca-key.pem` (the CA; its key signs certificates, so keep it
//! off the cluster's machines where possible), `DIR/NAME.pem` and `DIR/NAME-key.pem` per
//! certificate. Keys are written readable by their owner only.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use switchyard_proto::tls::{DOMAIN, Role, TlsFlags};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Make a cluster's CA: DIR/ca.pem and DIR/ca-key.pem.
    Ca {
        /// Where the CA's files go (made if missing; an existing CA is never overwritten).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Make DIR's CA if it has none, and issue a certificate for each ROLE:NAME given (for a
    /// deployment's one-shot setup step, as in deploy/compose.yaml).
    Init {
        /// Where the CA and the certificates go.
        #[arg(long)]
        dir: PathBuf,
        /// `ROLE:NAME` each, e.g. `coordinator:c1 expert-node:n1 router:r1 admin:ops`.
        #[arg(required = true)]
        certificates: Vec<String>,
    },
    /// Issue a certificate for one process of a role, signed by DIR's CA: DIR/NAME.pem and
    /// DIR/NAME-key.pem. Pass them as --tls-cert/--tls-key, with --tls-ca DIR/ca.pem.
    Issue {
        /// The directory holding the CA (from `switchyard tls ca`).
        #[arg(long)]
        dir: PathBuf,
        /// coordinator, expert-node, router or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The instance's name (letters, digits and '-'; default: the role's name).
        #[arg(long)]
        name: Option<String>,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| {
        let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
        format!("unknown role {text:?}: one of {}", names.join(", "))
    })
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Ca { dir } => {
            if dir.join(CA_CERT).exists() {
                bail!("{} already holds a CA; certificates it issued would stop being trusted", dir.display());
            }
            Authority::create(&dir)?;
            println!("{}", dir.join(CA_CERT).display());
        }
        Command::Init { dir, certificates } => {
            let wanted = certificates
                .iter()
                .map(|c| {
                    let (role, name) = c.split_once(':').with_context(|| format!("{c:?} is not ROLE:NAME"))?;
                    Ok((parse_role(role).map_err(anyhow::Error::msg)?, name.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let authority = Authority::open_or_create(&dir)?;
            for (role, name) in &wanted {
                authority.issue(*role, name)?;
            }
            println!("{} certificates in {}", wanted.len(), dir.display());
        }
        Command::Issue { dir, role, name } => {
            let authority = Authority::open(&dir)?;
            let name = name.unwrap_or_else(|| role.name().to_string());
            let flags = authority.issue(role, &name)?;
            println!(
                "--tls-ca {} --tls-cert {} --tls-key {}",
                flags.ca.unwrap_or_default().display(),
                flags.cert.unwrap_or_default().display(),
                flags.key.unwrap_or_default().display()
            );
        }
    }
    Ok(())
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
/// The CA's subject; issued certificates name it as their issuer.
const CA_NAME: &str = "Switchyard cluster CA";

/// A CA whose key is at hand: issues certificates into its directory.
pub struct Authority {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// Makes a new CA in `dir`.
    pub fn create(dir: &Path) -> Result<Authority> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let key = KeyPair::generate().context("cannot make the CA's key")?;
        let cert = ca_params().self_signed(&key).context("cannot sign the CA's certificate")?;
        write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
        std::fs::write(dir.join(CA_CERT), cert.pem()).with_context(|| format!("cannot write {}", dir.display()))?;
        Ok(Authority { dir: dir.to_path_buf(), issuer: Issuer::new(ca_params(), key) })
    }

    /// The CA made earlier in `dir` by [`Authority::create`].
    pub fn open(dir: &Path) -> Result<Authority> {
        let path = dir.join(CA_KEY);
        let pem = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read the CA's key {} (make one with `switchyard tls ca`)", path.display())
        })?;
        let key = KeyPair::from_pem(&pem).with_context(|| format!("{} is not a PEM private key", path.display()))?;
        Ok(Authority { dir: dir.to_path_buf(), issuer: Issuer::new(ca_params(), key) })
    }

    /// The CA in `dir`, made there if it has none.
    pub fn open_or_create(dir: &Path) -> Result<Authority> {
        if dir.join(CA_KEY).exists() { Authority::open(dir) } else { Authority::create(dir) }
    }

    /// Issues `name`'s certificate for `role` (replacing an earlier one of that name) and
    /// returns the flags that present it.
    pub fn issue(&self, role: Role, name: &str) -> Result<TlsFlags> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') || name.starts_with('-') {
            bail!("certificate name {name:?}: use letters, digits and '-' (it becomes a DNS label)");
        }
        let names = vec![role.domain(), format!("{name}.{}.{DOMAIN}", role.name())];
        let mut params = CertificateParams::new(names).context("certificate names")?;
        params.distinguished_name.push(DnType::CommonName, format!("{name} ({role})"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every role is both a server and a client of the others.
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().context("cannot make a key")?;
        let cert = params.signed_by(&key, &self.issuer).with_context(|| format!("cannot sign {name}'s certificate"))?;
        let (cert_path, key_path) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")));
        write_private(&key_path, &key.serialize_pem())?;
        std::fs::write(&cert_path, cert.pem()).with_context(|| format!("cannot write {}", cert_path.display()))?;
        Ok(TlsFlags::files(self.dir.join(CA_CERT), cert_path, key_path))
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// Writes a key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    Ok(())
}

/// The flags that present `flags`' certificate, for a child process's command line.
pub fn as_args(flags: &TlsFlags) -> Vec<String> {
    if flags.insecure_plaintext {
        return vec!["--insecure-plaintext".into()];
    }
    let mut args = Vec::new();
    for (flag, path) in [("--tls-ca", &flags.ca), ("--tls-cert", &flags.cert), ("--tls-key", &flags.key)] {
        if let Some(p) = path {
            args.extend([flag.to_string(), p.display().to_string()]);
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_hold_their_role_and_load_only_as_it() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::create(dir.path()).unwrap();
        let node = authority.issue(Role::Node, "n1").unwrap();
        assert!(node.load(Role::Node).is_ok());
        let err = node.load(Role::Admin).err().unwrap();
        assert!(err.contains("is not a certificate of role admin"), "{err}");
        assert!(err.contains("it is for: expert-node"), "{err}");
        // The CA reopened from its directory issues certificates that chain to the same CA.
        let again = Authority::open(dir.path()).unwrap().issue(Role::Admin, "ops").unwrap();
        assert!(again.load(Role::Admin).is_ok());
        assert!(authority.issue(Role::Router, "bad name").is_err());
        let missing = TlsFlags { key: None, ..node.clone() };
        assert!(missing.load(Role::Node).err().unwrap().contains("--tls-key missing"));
        assert!(TlsFlags::default().load(Role::Node).err().unwrap().contains("--insecure-plaintext"));
    }
}
