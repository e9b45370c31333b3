//! Writes the client, server and schema modules of each service.

use heck::{ToShoutySnakeCase, ToSnakeCase};
use prost_build::{Comments, Method, Service, ServiceGenerator};

use crate::schema::{MethodSchema, ServiceSchema};

/// The [`ServiceGenerator`] prost-build calls for each service.
pub(crate) struct Generator {
    pub(crate) client: bool,
    pub(crate) server: bool,
    pub(crate) grpc: bool,
    /// Path of the runtime crate, e.g. `::shmesh_protobuf`.
    pub(crate) runtime: String,
}

/// Appends one formatted line to a `String`.
macro_rules! emit {
    ($buf:expr, $($arg:tt)*) => {{
        $buf.push_str(&format!($($arg)*));
        $buf.push('\n');
    }};
}

/// The four kinds of RPC.
#[derive(Clone, Copy)]
enum Kind {
    Unary,
    ServerStreaming,
    ClientStreaming,
    Bidi,
}

impl Kind {
    fn of(m: &Method) -> Kind {
        match (m.client_streaming, m.server_streaming) {
            (false, false) => Kind::Unary,
            (false, true) => Kind::ServerStreaming,
            (true, false) => Kind::ClientStreaming,
            (true, true) => Kind::Bidi,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStreaming => "server streaming",
            Kind::ClientStreaming => "client streaming",
            Kind::Bidi => "bidirectional streaming",
        }
    }

    /// The runtime's function for this kind: the same name in its
    /// `client`, `blocking`, `server` and `grpc` modules (with `call_` in
    /// front for a transport's call).
    fn helper(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStreaming => "server_streaming",
            Kind::ClientStreaming => "client_streaming",
            Kind::Bidi => "bidi_streaming",
        }
    }

    /// Whether the client sends one request, given with the call (rather
    /// than streamed after it).
    fn one_request(self) -> bool {
        matches!(self, Kind::Unary | Kind::ServerStreaming)
    }

    /// The names of the server trait method's parameters after `&self`.
    fn server_params(self) -> &'static str {
        match self {
            Kind::Unary => "request",
            Kind::ServerStreaming => "request, responses",
            Kind::ClientStreaming => "requests",
            Kind::Bidi => "call",
        }
    }
}

/// One of the two clients written per service: async or blocking.
struct Flavour {
    /// Starts the doc comments: "An async", "A blocking".
    article: &'static str,
    /// Ends the module's name (`{service}{module}`).
    module: &'static str,
    /// Ends the type's name (`{Service}{ty}`).
    ty: &'static str,
    /// The channel type under the runtime's `shmesh`.
    channel: &'static str,
    /// The runtime's module the calls go through.
    calls: &'static str,
    /// How a call that waits is declared and awaited.
    asyncs: &'static str,
    awaits: &'static str,
    /// With gRPC: the runtime's module of the transport picked from the
    /// address's scheme (`shm://` or `http(s)://`), and its type.
    transport_module: &'static str,
    transport: &'static str,
}

const ASYNC: Flavour = Flavour {
    article: "An async",
    module: "_client",
    ty: "Client",
    channel: "asynchronous::AsyncChannel",
    calls: "client",
    asyncs: "async ",
    awaits: ".await",
    transport_module: "grpc",
    transport: "Transport",
};

const BLOCKING: Flavour = Flavour {
    article: "A blocking",
    module: "_blocking_client",
    ty: "BlockingClient",
    channel: "client::Channel",
    calls: "blocking",
    asyncs: "",
    awaits: "",
    transport_module: "grpc_blocking",
    transport: "BlockingTransport",
};

/// A protobuf type name without its leading dot.
fn proto_name(name: &str) -> &str {
    name.strip_prefix('.').unwrap_or(name)
}

/// The service's fully qualified name.
fn full_name(service: &Service) -> String {
    if service.package.is_empty() {
        service.proto_name.clone()
    } else {
        format!("{}.{}", service.package, service.proto_name)
    }
}

/// The schema the hash is taken of.
pub(crate) fn schema_of(service: &Service) -> ServiceSchema {
    ServiceSchema {
        name: full_name(service),
        methods: service
            .methods
            .iter()
            .map(|m| MethodSchema {
                name: m.proto_name.clone(),
                input_type: proto_name(&m.input_proto_type).to_owned(),
                output_type: proto_name(&m.output_proto_type).to_owned(),
                client_streaming: m.client_streaming,
                server_streaming: m.server_streaming,
            })
            .collect(),
    }
}

/// Emits `pub struct {ty}<T> { inner: Arc<T> }` with its `Debug` and
/// `Clone` (neither requiring `T` to have them): the shape of both the
/// shmesh and the gRPC server wrappers.
fn arc_wrapper(buf: &mut String, ty: &str) {
    emit!(
        buf,
        "    pub struct {ty}<T> {{
        inner: ::std::sync::Arc<T>,
    }}
    impl<T> ::core::fmt::Debug for {ty}<T> {{
        fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{
            f.debug_struct(\"{ty}\").finish_non_exhaustive()
        }}
    }}
    impl<T> ::core::clone::Clone for {ty}<T> {{
        fn clone(&self) -> Self {{
            Self {{ inner: self.inner.clone() }}
        }}
    }}"
    );
}

/// Doc comments from the `.proto`, or `fallback` when it has none.
fn docs(buf: &mut String, comments: &Comments, indent: u8, fallback: &str) {
    if comments.leading.is_empty() && comments.trailing.is_empty() {
        let pad = "    ".repeat(usize::from(indent));
        emit!(buf, "{pad}/// {fallback}");
    } else {
        let docs = Comments {
            leading_detached: Vec::new(),
            leading: comments.leading.clone(),
            trailing: comments.trailing.clone(),
        };
        docs.append_with_indent(indent, buf);
    }
}

impl ServiceGenerator for Generator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let module = service.name.to_snake_case();
        self.schema(&service, &module, buf);
        if self.client {
            self.client(&service, &module, buf, &ASYNC);
            self.client(&service, &module, buf, &BLOCKING);
        }
        if self.server {
            self.server(&service, &module, buf);
        }
    }
}

impl Generator {
    fn schema(&self, service: &Service, module: &str, buf: &mut String) {
        let rt = &self.runtime;
        let name = full_name(service);
        let hash = schema_of(service).hash();
        let hash = hash.map(|b| format!("{b:#04x}")).join(", ");
        emit!(
            buf,
            "/// The schema of the `{name}` service: its name and hash, which the
/// handshake checks, and the id of each method.
pub mod {module}_schema {{
    /// The fully qualified service name.
    pub const SERVICE_NAME: &str = \"{name}\";
    /// SHA-256 of the service's canonical description (its name, and each
    /// method's name, request and response types and streaming, in order):
    /// a client and a server built from different ones refuse each other.
    pub const SCHEMA_HASH: {rt}::shmesh::SchemaHash = {rt}::shmesh::SchemaHash([{hash}]);"
        );
        for (i, m) in service.methods.iter().enumerate() {
            let (proto_name, kind) = (&m.proto_name, Kind::of(m).describe());
            let (id_name, id) = (m.name.to_shouty_snake_case(), i + 1);
            emit!(
                buf,
                "    /// Method id of `{proto_name}` ({kind}).
    pub const {id_name}: u32 = {id};"
            );
        }
        emit!(
            buf,
            "    /// Options to connect a channel to a `{name}` server.
    pub fn channel_options() -> {rt}::shmesh::client::ChannelOptions {{
        {rt}::shmesh::client::ChannelOptions::new(SERVICE_NAME, SCHEMA_HASH)
    }}
}}"
        );
    }

    fn client(&self, service: &Service, module: &str, buf: &mut String, flavour: &Flavour) {
        let rt = &self.runtime;
        let name = full_name(service);
        let Flavour {
            article,
            calls,
            asyncs,
            awaits,
            ..
        } = *flavour;
        let mod_name = format!("{module}{}", flavour.module);
        let ty = format!("{}{}", service.name, flavour.ty);
        let grpc = self.grpc;
        let (channel, error, call, scheme_doc) = if grpc {
            let (module, transport) = (flavour.transport_module, flavour.transport);
            (
                format!("{rt}::{module}::{transport}"),
                format!("{rt}::grpc::ConnectError"),
                format!("{rt}::{module}::call_"),
                "`shm://@name`, or `http://host:port` for gRPC",
            )
        } else {
            (
                format!("{rt}::shmesh::{}", flavour.channel),
                format!("{rt}::shmesh::client::ChannelError"),
                format!("{rt}::{calls}::"),
                "`shm://@name`",
            )
        };
        emit!(buf, "/// {article} client of the `{name}` service.");
        emit!(buf, "pub mod {mod_name} {{");
        docs(
            buf,
            &service.comments,
            1,
            &format!("{article} client of the `{name}` service. Cheap to clone."),
        );
        emit!(
            buf,
            "    #[derive(Debug, Clone)]
    pub struct {ty} {{
        channel: {channel},
        timeout: ::core::option::Option<::core::time::Duration>,
        metadata: {rt}::shmesh::metadata::Metadata,
    }}
    impl {ty} {{
        /// Connects to the `{name}` server at `address` (`shm:///path` or
        /// {scheme_doc}); fails if the server serves another service or another
        /// version of its schema.
        pub {asyncs}fn connect(address: &str) -> ::core::result::Result<Self, {error}> {{
            let channel = {channel}::connect(address, &super::{module}_schema::channel_options()){awaits}?;
            ::core::result::Result::Ok(Self::new(channel))
        }}
        /// A client on a connected channel (whose options must be
        /// [`super::{module}_schema::channel_options`]).
        pub fn new(channel: {channel}) -> Self {{
            Self {{
                channel,
                timeout: ::core::option::Option::None,
                metadata: {rt}::shmesh::metadata::Metadata::new(),
            }}
        }}
        /// Every call made through the returned client must end within `timeout`.
        #[must_use]
        pub fn with_timeout(mut self, timeout: ::core::time::Duration) -> Self {{
            self.timeout = ::core::option::Option::Some(timeout);
            self
        }}
        /// Every call made through the returned client carries `metadata`
        /// (over gRPC as request headers): clone the client for per-call
        /// metadata such as a `traceparent`.
        #[must_use]
        pub fn with_metadata(mut self, metadata: {rt}::shmesh::metadata::Metadata) -> Self {{
            self.metadata = metadata;
            self
        }}
        /// The channel underneath.
        pub fn channel(&self) -> &{channel} {{
            &self.channel
        }}"
        );
        for m in &service.methods {
            let kind = Kind::of(m);
            let (input, output) = (
                format!("super::{}", m.input_type),
                format!("super::{}", m.output_type),
            );
            let id = format!("super::{module}_schema::{}", m.name.to_shouty_snake_case());
            let (method, out_name) = (&m.name, proto_name(&m.output_proto_type));
            let status = format!("{rt}::shmesh::status::Status");
            // gRPC's path of the method, passed only to transport calls.
            let path = if grpc {
                format!("\"/{name}/{}\", ", m.proto_name)
            } else {
                String::new()
            };
            docs(
                buf,
                &m.comments,
                2,
                &format!("Calls `{}` ({}).", m.proto_name, kind.describe()),
            );
            let helper = kind.helper();
            let returns = match kind {
                Kind::Unary => output,
                Kind::ServerStreaming => format!("{rt}::{calls}::Streaming<{output}>"),
                Kind::ClientStreaming => {
                    format!("{rt}::{calls}::ClientStreaming<{input}, {output}>")
                }
                Kind::Bidi => format!("{rt}::{calls}::BidiStreaming<{input}, {output}>"),
            };
            // A call given its one request waits for the server; one that
            // streams its requests returns at once.
            let (asyncs, param, arg, awaits) = if kind.one_request() {
                (
                    asyncs,
                    format!(", request: impl ::core::borrow::Borrow<{input}>"),
                    "request.borrow(), ",
                    awaits,
                )
            } else {
                ("", String::new(), "", "")
            };
            emit!(
                buf,
                "        pub {asyncs}fn {method}(&self{param}) -> ::core::result::Result<{returns}, {status}> {{
            {call}{helper}(&self.channel, {id}, {path}{arg}&self.metadata, self.timeout, \"{out_name}\"){awaits}
        }}"
            );
        }
        emit!(buf, "    }}\n}}");
    }

    fn server(&self, service: &Service, module: &str, buf: &mut String) {
        let rt = &self.runtime;
        let name = full_name(service);
        let trait_name = &service.name;
        let ty = format!("{}Server", service.name);
        let status = format!("{rt}::shmesh::status::Status");
        emit!(buf, "/// The server side of the `{name}` service.");
        emit!(buf, "pub mod {module}_server {{");
        docs(
            buf,
            &service.comments,
            1,
            &format!("The `{name}` service, to implement with `async fn`s."),
        );
        emit!(
            buf,
            "    pub trait {trait_name}: ::core::marker::Send + ::core::marker::Sync + 'static {{"
        );
        for m in &service.methods {
            let kind = Kind::of(m);
            let (input, output) = (
                format!("super::{}", m.input_type),
                format!("super::{}", m.output_type),
            );
            docs(
                buf,
                &m.comments,
                2,
                &format!("Serves `{}` ({}).", m.proto_name, kind.describe()),
            );
            let (params, ret) = match kind {
                Kind::Unary => (format!("request: {rt}::Request<{input}>"), output),
                Kind::ServerStreaming => (
                    format!(
                        "request: {rt}::Request<{input}>, responses: {rt}::server::ResponseSink<{output}>"
                    ),
                    "()".to_owned(),
                ),
                Kind::ClientStreaming => (
                    format!("requests: {rt}::server::RequestStream<{input}>"),
                    output,
                ),
                Kind::Bidi => (
                    format!("call: {rt}::server::BidiStream<{input}, {output}>"),
                    "()".to_owned(),
                ),
            };
            let method = &m.name;
            emit!(
                buf,
                "        fn {method}(&self, {params}) -> impl ::core::future::Future<Output = ::core::result::Result<{ret}, {status}>> + ::core::marker::Send;"
            );
        }
        emit!(buf, "    }}");
        emit!(
            buf,
            "    /// Serves a [`{trait_name}`] implementation over shmesh."
        );
        arc_wrapper(buf, &ty);
        emit!(
            buf,
            "    impl<T: {trait_name}> {ty}<T> {{
        /// Serves `inner`.
        pub fn new(inner: T) -> Self {{
            Self::from_arc(::std::sync::Arc::new(inner))
        }}
        /// Serves a shared `inner`.
        pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{
            Self {{ inner }}
        }}
        /// A router serving each method on its id (see [`super::{module}_schema`]);
        /// the handlers run on the server's tokio runtime.
        pub fn into_router(self) -> {rt}::shmesh::server::Router {{"
        );
        if service.methods.is_empty() {
            emit!(buf, "            {rt}::shmesh::server::Router::new()");
        } else {
            emit!(
                buf,
                "            let mut router = {rt}::shmesh::server::Router::new();"
            );
            for m in &service.methods {
                let kind = Kind::of(m);
                let id = format!("super::{module}_schema::{}", m.name.to_shouty_snake_case());
                let in_name = proto_name(&m.input_proto_type);
                let method = &m.name;
                let (helper, params) = (kind.helper(), kind.server_params());
                emit!(
                    buf,
                    "            router = {rt}::server::{helper}(router, {id}, self.inner.clone(), \"{in_name}\", |service: ::std::sync::Arc<T>, {params}| async move {{ service.{method}({params}).await }});"
                );
            }
            emit!(buf, "            router");
        }
        emit!(
            buf,
            "        }}
        /// A server for this service bound at `address` (`shm:///path` or
        /// `shm://@name`): run it with `serve`, or on a thread of its own with
        /// `BackgroundServer::spawn`.
        pub fn bind(self, address: &str) -> ::core::result::Result<{rt}::shmesh::server::Server, {rt}::shmesh::server::ServerError> {{
            {rt}::shmesh::server::Server::bind(address, super::{module}_schema::SERVICE_NAME, super::{module}_schema::SCHEMA_HASH, self.into_router())
        }}
    }}"
        );
        if self.grpc {
            self.grpc(service, trait_name, &ty, buf);
        }
        emit!(buf, "}}");
    }

    /// The gRPC front-end of a server: a tonic service calling the same
    /// trait.
    fn grpc(&self, service: &Service, trait_name: &str, server: &str, buf: &mut String) {
        let rt = &self.runtime;
        let name = full_name(service);
        let ty = format!("{}GrpcServer", service.name);
        let codegen = format!("{rt}::grpc::tonic::codegen");
        emit!(
            buf,
            "    impl<T: {trait_name}> {server}<T> {{
        /// The same service over gRPC: a tonic service to add to a
        /// `tonic::transport::Server`.
        pub fn into_grpc(self) -> {ty}<T> {{
            {ty} {{ inner: self.inner }}
        }}
    }}
    /// A [`{trait_name}`] implementation served over gRPC by tonic (from
    /// [`{server}::into_grpc`])."
        );
        arc_wrapper(buf, &ty);
        emit!(
            buf,
            "    impl<T> {rt}::grpc::tonic::server::NamedService for {ty}<T> {{
        const NAME: &'static str = \"{name}\";
    }}
    impl<T: {trait_name}, B> {codegen}::Service<{codegen}::http::Request<B>> for {ty}<T>
    where
        B: {codegen}::Body + ::core::marker::Send + 'static,
        B::Error: ::core::convert::Into<{codegen}::StdError> + ::core::marker::Send + 'static,
    {{
        type Response = {codegen}::http::Response<{rt}::grpc::tonic::body::Body>;
        type Error = ::core::convert::Infallible;
        type Future = {rt}::grpc::GrpcFuture;
        fn poll_ready(&mut self, _cx: &mut ::core::task::Context<'_>) -> ::core::task::Poll<::core::result::Result<(), Self::Error>> {{
            ::core::task::Poll::Ready(::core::result::Result::Ok(()))
        }}
        fn call(&mut self, request: {codegen}::http::Request<B>) -> Self::Future {{
            match request.uri().path() {{"
        );
        for m in &service.methods {
            let (method, proto_name) = (&m.name, &m.proto_name);
            let kind = Kind::of(m);
            let (helper, params) = (kind.helper(), kind.server_params());
            emit!(
                buf,
                "                \"/{name}/{proto_name}\" => {rt}::grpc::{helper}(self.inner.clone(), |service: ::std::sync::Arc<T>, {params}| async move {{ service.{method}({params}).await }}, request),"
            );
        }
        emit!(
            buf,
            "                path => {rt}::grpc::unimplemented(path),
            }}
        }}
    }}"
        );
    }
}
