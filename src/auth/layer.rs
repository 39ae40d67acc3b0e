//! The tower layer that authenticates every `ingest.v1.Ingest` call from its headers
//! (and TLS session) before anything reads its body: a refused call is answered
//! `UNAUTHENTICATED` at once, its body never read and nothing of it admitted. An
//! authenticated call carries its [`Caller`] in the request extensions for the
//! intake (the tenant's quota) and the handlers (topics, the tenant header).

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use tonic::body::Body;

use super::{Authenticator, Caller};
use crate::{telemetry::Metrics, transport::PeerInfo};

/// Paths that need a credential: the publishing service. Health and reflection stay
/// open (probes, `grpcurl list`).
const PROTECTED: &str = "/ingest.v1.Ingest/";

/// Puts [`Auth`] in front of the routes; with no tenants file it passes every call.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    authenticator: Option<Arc<Authenticator>>,
    metrics: Metrics,
}

impl AuthLayer {
    /// A layer over `authenticator` (`None`: no authentication).
    pub fn new(authenticator: Option<Arc<Authenticator>>, metrics: Metrics) -> Self {
        Self {
            authenticator,
            metrics,
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            authenticator: self.authenticator.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the routes.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    authenticator: Option<Arc<Authenticator>>,
    metrics: Metrics,
}

impl<S> tower_service::Service<http::Request<Body>> for Auth<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Some(authenticator) = &self.authenticator else {
            return Either::Right(self.inner.call(request));
        };
        if !request.uri().path().starts_with(PROTECTED) {
            return Either::Right(self.inner.call(request));
        }
        let peer = request.extensions().get::<PeerInfo>();
        match authenticator.authenticate(request.headers(), peer) {
            Ok(tenant) => {
                request.extensions_mut().insert(Caller(tenant));
                Either::Right(self.inner.call(request))
            }
            Err(why) => {
                self.metrics.unauthenticated();
                tracing::debug!(path = request.uri().path(), remote = ?peer.and_then(|p| p.remote), %why, "unauthenticated call refused");
                let status = crate::api::status::unauthenticated(&why);
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}
