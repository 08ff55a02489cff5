//! How a receiver with `[receiver] ca_file` decides to trust the gateway's
//! certificate: rustls's webpki verifier against the certificates of
//! `ca_file`, plus the one case webpki refuses by design that operators
//! meet first — the gateway's own **self-signed certificate used as the
//! CA**, e.g. made with
//!
//! ```sh
//! openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost \
//!     -addext subjectAltName=DNS:localhost -keyout gw.key -out gw.crt
//! ```
//!
//! and given to the receiver as `ca_file = "gw.crt"`. Such a certificate
//! says `CA:TRUE` (openssl's default for `req -x509`), and webpki refuses
//! a CA certificate presented as the end entity (`CaUsedAsEndEntity`);
//! without `CA:TRUE` it refuses it as issuer of itself. So: when webpki
//! refuses, and the certificate the gateway presented is **byte for byte**
//! one of `ca_file`'s, the operator has pinned that exact certificate and
//! we accept it after the two checks that still matter — it names the
//! host we dialled (subjectAltName, as webpki checks it) and it is within
//! its validity period. A chain, a signature by an issuer, key usages:
//! none of them adds trust to a certificate pinned by its bytes.
//!
//! The handshake's own signature (the gateway proving it holds the key)
//! is verified by webpki in every case. Never used with the system trust
//! store: nobody pins a public CA's certificate as a server's.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// webpki against `ca_file`, and a certificate of `ca_file` presented as
/// itself (see the module's comment).
#[derive(Debug)]
pub struct GatewayVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// Every certificate of `ca_file`, as its DER bytes.
    pinned: Vec<CertificateDer<'static>>,
}

impl GatewayVerifier {
    pub fn new(webpki: Arc<WebPkiServerVerifier>, pinned: Vec<CertificateDer<'static>>) -> Self {
        Self { webpki, pinned }
    }
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(ok) => return Ok(ok),
            Err(e) => e,
        };
        if !self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            return Err(refused);
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        check_validity(end_entity.as_ref(), now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `now` within the certificate's notBefore..=notAfter (RFC 5280
/// §4.1.2.5), read from its DER.
fn check_validity(cert: &[u8], now: UnixTime) -> Result<(), rustls::Error> {
    let bad = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let (not_before, not_after) = validity(cert).map_err(|_| bad())?;
    let now = now.as_secs();
    if now < not_before {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if now > not_after {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// notBefore and notAfter, in Unix seconds, of a DER certificate:
///
/// ```text
/// Certificate ::= SEQUENCE { tbsCertificate TBSCertificate, … }
/// TBSCertificate ::= SEQUENCE { version [0] EXPLICIT OPTIONAL,
///     serialNumber, signature, issuer, validity Validity, … }
/// Validity ::= SEQUENCE { notBefore Time, notAfter Time }
/// Time ::= CHOICE { utcTime UTCTime, generalTime GeneralizedTime }
/// ```
fn validity(cert: &[u8]) -> der::Result<(u64, u64)> {
    use der::asn1::{AnyRef, GeneralizedTime, UtcTime};
    use der::{Decode, SliceReader, Tag, Tagged};
    let seq =
        |any: AnyRef<'_>| -> der::Result<()> { any.tag().assert_eq(Tag::Sequence).map(|_| ()) };
    let certificate = AnyRef::from_der(cert)?;
    seq(certificate)?;
    let mut r = SliceReader::new(certificate.value())?;
    let tbs = AnyRef::decode(&mut r)?;
    seq(tbs)?;
    let mut t = SliceReader::new(tbs.value())?;
    if AnyRef::decode(&mut t)?.tag().is_context_specific() {
        let _serial_number = AnyRef::decode(&mut t)?; // after the version
    }
    let _signature = AnyRef::decode(&mut t)?;
    let _issuer = AnyRef::decode(&mut t)?;
    let validity = AnyRef::decode(&mut t)?;
    seq(validity)?;
    let mut v = SliceReader::new(validity.value())?;
    let time = |v: &mut SliceReader<'_>| -> der::Result<u64> {
        let any = AnyRef::decode(v)?;
        let d = match any.tag() {
            Tag::UtcTime => UtcTime::try_from(any)?.to_unix_duration(),
            _ => GeneralizedTime::try_from(any)?.to_unix_duration(),
        };
        Ok(d.as_secs())
    };
    let not_before = time(&mut v)?;
    let not_after = time(&mut v)?;
    Ok((not_before, not_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    /// A self-signed certificate as `openssl req -x509` makes it: CA:TRUE,
    /// the host in subjectAltName.
    fn self_signed(sans: &[&str], days: (i64, i64)) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, sans[0]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = at(days.0).into();
        p.not_after = at(days.1).into();
        p.self_signed(&key).unwrap().der().clone()
    }

    /// Now plus `days` (negative: in the past).
    fn at(days: i64) -> std::time::SystemTime {
        let d = std::time::Duration::from_secs(days.unsigned_abs() * 86_400);
        let now = std::time::SystemTime::now();
        if days < 0 {
            now - d
        } else {
            now + d
        }
    }

    fn verifier(pinned: &[&CertificateDer<'static>]) -> GatewayVerifier {
        let mut roots = rustls::RootCertStore::empty();
        for c in pinned {
            roots.add((*c).clone()).unwrap();
        }
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
                .build()
                .unwrap();
        GatewayVerifier::new(webpki, pinned.iter().map(|c| (*c).clone()).collect())
    }

    fn verify(v: &GatewayVerifier, cert: &CertificateDer<'_>, host: &str) -> Result<(), String> {
        let name = ServerName::try_from(host.to_owned()).unwrap();
        v.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn a_pinned_self_signed_certificate_is_trusted_for_its_own_names() {
        let cert = self_signed(&["localhost", "127.0.0.1"], (-1, 30));
        let v = verifier(&[&cert]);
        verify(&v, &cert, "localhost").unwrap();
        verify(&v, &cert, "127.0.0.1").unwrap();
        // Its name is still checked.
        let e = verify(&v, &cert, "gw.example.com").unwrap_err();
        assert!(e.contains("NotValidForName"), "{e}");
    }

    #[test]
    fn the_pin_is_by_bytes_and_validity_is_checked() {
        let pinned = self_signed(&["localhost"], (-1, 30));
        let other = self_signed(&["localhost"], (-1, 30));
        let v = verifier(&[&pinned]);
        // Another self-signed certificate for the same name: refused.
        assert!(verify(&v, &other, "localhost").is_err());
        let expired = self_signed(&["localhost"], (-30, -1));
        let e = verify(&verifier(&[&expired]), &expired, "localhost").unwrap_err();
        assert!(e.contains("Expired"), "{e}");
        let future = self_signed(&["localhost"], (1, 30));
        let e = verify(&verifier(&[&future]), &future, "localhost").unwrap_err();
        assert!(e.contains("NotValidYet"), "{e}");
    }

    #[test]
    fn validity_reads_both_time_forms() {
        let cert = self_signed(&["localhost"], (-1, 30));
        let (nb, na) = validity(cert.as_ref()).unwrap();
        assert!(na > nb && na - nb >= 30 * 86_400, "{nb} {na}");
        assert!(validity(b"\x30\x03\x02\x01\x01").is_err());
        assert!(validity(b"").is_err());
    }
}
