//! Client helpers: connecting to a sakuga server with an optional bearer token, and the
//! generated clients with sakuga's message size limits.

use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use sakuga_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use sakuga_proto::v1::node_service_client::NodeServiceClient;
use sakuga_proto::v1::render_service_client::RenderServiceClient;
use sakuga_proto::v1::signal_service_client::SignalServiceClient;

/// Adds `authorization: Bearer <token>` to every request when a token is set.
#[derive(Debug, Clone)]
pub struct TokenInterceptor {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, TokenInterceptor>;

/// Clients of every sakuga service over one connection.
#[derive(Debug, Clone)]
pub struct SakugaClient {
    pub render: RenderServiceClient<Authed>,
    pub signals: SignalServiceClient<Authed>,
    pub nodes: NodeServiceClient<Authed>,
    pub scaler: ExternalScalerClient<Authed>,
    pub channel: Channel,
}

/// Largest message the client accepts (frames of big previews).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

impl SakugaClient {
    /// Connects to `url` (`http://127.0.0.1:50051`).
    ///
    /// # Errors
    /// A bad URL or token, or a failed connection.
    pub async fn connect(url: &str, token: Option<&str>) -> anyhow::Result<Self> {
        Self::connect_with(url, token, None).await
    }

    /// Connects over TLS when `tls` is set: `(CA certificate PEM, server name to verify)`.
    ///
    /// # Errors
    /// A bad URL, token or certificate, or a failed connection or handshake.
    pub async fn connect_with(
        url: &str,
        token: Option<&str>,
        tls: Option<(&[u8], &str)>,
    ) -> anyhow::Result<Self> {
        // Frames stream without waiting on window updates (see the server's window).
        let mut endpoint = Endpoint::from_shared(url.to_owned())?
            .initial_stream_window_size(crate::server::FRAME_WINDOW_BYTES)
            .initial_connection_window_size(2 * crate::server::FRAME_WINDOW_BYTES);
        if let Some((ca_pem, domain)) = tls {
            let config = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
                .domain_name(domain);
            endpoint = endpoint.tls_config(config)?;
        }
        let channel = endpoint.connect().await?;
        let header = match token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse()?),
            None => None,
        };
        let auth = TokenInterceptor { header };
        Ok(Self {
            render: RenderServiceClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            signals: SignalServiceClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            nodes: NodeServiceClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            scaler: ExternalScalerClient::with_interceptor(channel.clone(), auth),
            channel,
        })
    }
}
