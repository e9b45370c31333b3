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
}

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

/// Doc comments from the `.proto`, or `fallback` when it has none.
/// Emits `pub struct {ty}<T> { inner: Arc<T> }` with its `Debug` and
/// `Clone` (neither requiring `T` to have them): the shape of both the
/// shmesh and the gRPC server wrappers.
fn arc_wrapper(buf: &mut String, ty: &str) {
    emit!(buf, "    pub struct {ty}<T> {{");
    emit!(buf, "        inner: ::std::sync::Arc<T>,");
    emit!(buf, "    }}");
    emit!(buf, "    impl<T> ::core::fmt::Debug for {ty}<T> {{");
    emit!(
        buf,
        "        fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{"
    );
    emit!(
        buf,
        "            f.debug_struct(\"{ty}\").finish_non_exhaustive()"
    );
    emit!(buf, "        }}");
    emit!(buf, "    }}");
    emit!(buf, "    impl<T> ::core::clone::Clone for {ty}<T> {{");
    emit!(buf, "        fn clone(&self) -> Self {{");
    emit!(buf, "            Self {{ inner: self.inner.clone() }}");
    emit!(buf, "        }}");
    emit!(buf, "    }}");
}

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
            self.client(&service, &module, buf, false);
            self.client(&service, &module, buf, true);
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
            "/// The schema of the `{name}` service: its name and hash, which the"
        );
        emit!(buf, "/// handshake checks, and the id of each method.");
        emit!(buf, "pub mod {module}_schema {{");
        emit!(buf, "    /// The fully qualified service name.");
        emit!(buf, "    pub const SERVICE_NAME: &str = \"{name}\";");
        emit!(
            buf,
            "    /// SHA-256 of the service's canonical description (its name, and each"
        );
        emit!(
            buf,
            "    /// method's name, request and response types and streaming, in order):"
        );
        emit!(
            buf,
            "    /// a client and a server built from different ones refuse each other."
        );
        emit!(
            buf,
            "    pub const SCHEMA_HASH: {rt}::shmesh::SchemaHash = {rt}::shmesh::SchemaHash([{hash}]);"
        );
        for (i, m) in service.methods.iter().enumerate() {
            emit!(
                buf,
                "    /// Method id of `{}` ({}).",
                m.proto_name,
                Kind::of(m).describe()
            );
            emit!(
                buf,
                "    pub const {}: u32 = {};",
                m.name.to_shouty_snake_case(),
                i + 1
            );
        }
        emit!(
            buf,
            "    /// Options to connect a channel to a `{name}` server."
        );
        emit!(
            buf,
            "    pub fn channel_options() -> {rt}::shmesh::client::ChannelOptions {{"
        );
        emit!(
            buf,
            "        {rt}::shmesh::client::ChannelOptions::new(SERVICE_NAME, SCHEMA_HASH)"
        );
        emit!(buf, "    }}");
        emit!(buf, "}}");
    }

    fn client(&self, service: &Service, module: &str, buf: &mut String, blocking: bool) {
        let rt = &self.runtime;
        let name = full_name(service);
        let (mod_name, ty, channel, calls, awaits, asyncs) = if blocking {
            let ty = format!("{}BlockingClient", service.name);
            (
                format!("{module}_blocking_client"),
                ty,
                "client::Channel",
                "blocking",
                "",
                "",
            )
        } else {
            let ty = format!("{}Client", service.name);
            (
                format!("{module}_client"),
                ty,
                "asynchronous::AsyncChannel",
                "client",
                ".await",
                "async ",
            )
        };
        let flavour = if blocking { "A blocking" } else { "An async" };
        // With gRPC, the async client calls through a transport picked from
        // the address's scheme.
        let grpc = self.grpc && !blocking;
        let (channel, error, call, scheme_doc) = if grpc {
            (
                format!("{rt}::grpc::Transport"),
                format!("{rt}::grpc::ConnectError"),
                format!("{rt}::grpc::call_"),
                "`shm://@name`, or `http://host:port` for gRPC",
            )
        } else {
            (
                format!("{rt}::shmesh::{channel}"),
                format!("{rt}::shmesh::client::ChannelError"),
                format!("{rt}::{calls}::"),
                "`shm://@name`",
            )
        };
        emit!(buf, "/// {flavour} client of the `{name}` service.");
        emit!(buf, "pub mod {mod_name} {{");
        docs(
            buf,
            &service.comments,
            1,
            &format!("{flavour} client of the `{name}` service. Cheap to clone."),
        );
        emit!(buf, "    #[derive(Debug, Clone)]");
        emit!(buf, "    pub struct {ty} {{");
        emit!(buf, "        channel: {channel},");
        emit!(
            buf,
            "        timeout: ::core::option::Option<::core::time::Duration>,"
        );
        emit!(buf, "    }}");
        emit!(buf, "    impl {ty} {{");
        emit!(
            buf,
            "        /// Connects to the `{name}` server at `address` (`shm:///path` or"
        );
        emit!(
            buf,
            "        /// {scheme_doc}); fails if the server serves another service or another"
        );
        emit!(buf, "        /// version of its schema.");
        emit!(
            buf,
            "        pub {asyncs}fn connect(address: &str) -> ::core::result::Result<Self, {error}> {{"
        );
        emit!(
            buf,
            "            let channel = {channel}::connect(address, &super::{module}_schema::channel_options()){awaits}?;"
        );
        emit!(
            buf,
            "            ::core::result::Result::Ok(Self::new(channel))"
        );
        emit!(buf, "        }}");
        emit!(
            buf,
            "        /// A client on a connected channel (whose options must be"
        );
        emit!(
            buf,
            "        /// [`super::{module}_schema::channel_options`])."
        );
        emit!(buf, "        pub fn new(channel: {channel}) -> Self {{");
        emit!(
            buf,
            "            Self {{ channel, timeout: ::core::option::Option::None }}"
        );
        emit!(buf, "        }}");
        emit!(
            buf,
            "        /// Every call made through the returned client must end within `timeout`."
        );
        emit!(buf, "        #[must_use]");
        emit!(
            buf,
            "        pub fn with_timeout(mut self, timeout: ::core::time::Duration) -> Self {{"
        );
        emit!(
            buf,
            "            self.timeout = ::core::option::Option::Some(timeout);"
        );
        emit!(buf, "            self");
        emit!(buf, "        }}");
        emit!(buf, "        /// The channel underneath.");
        emit!(buf, "        pub fn channel(&self) -> &{channel} {{");
        emit!(buf, "            &self.channel");
        emit!(buf, "        }}");
        for m in &service.methods {
            let kind = Kind::of(m);
            let (input, output) = (
                format!("super::{}", m.input_type),
                format!("super::{}", m.output_type),
            );
            let id = format!("super::{module}_schema::{}", m.name.to_shouty_snake_case());
            let out_name = proto_name(&m.output_proto_type);
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
            match kind {
                Kind::Unary => {
                    emit!(
                        buf,
                        "        pub {asyncs}fn {}(&self, request: impl ::core::borrow::Borrow<{input}>) -> ::core::result::Result<{output}, {status}> {{",
                        m.name
                    );
                    emit!(
                        buf,
                        "            {call}unary(&self.channel, {id}, {path}request.borrow(), self.timeout, \"{out_name}\"){awaits}"
                    );
                }
                Kind::ServerStreaming => {
                    emit!(
                        buf,
                        "        pub {asyncs}fn {}(&self, request: impl ::core::borrow::Borrow<{input}>) -> ::core::result::Result<{rt}::{calls}::Streaming<{output}>, {status}> {{",
                        m.name
                    );
                    emit!(
                        buf,
                        "            {call}server_streaming(&self.channel, {id}, {path}request.borrow(), self.timeout, \"{out_name}\"){awaits}"
                    );
                }
                Kind::ClientStreaming => {
                    emit!(
                        buf,
                        "        pub fn {}(&self) -> ::core::result::Result<{rt}::{calls}::ClientStreaming<{input}, {output}>, {status}> {{",
                        m.name
                    );
                    emit!(
                        buf,
                        "            {call}client_streaming(&self.channel, {id}, {path}self.timeout, \"{out_name}\")"
                    );
                }
                Kind::Bidi => {
                    emit!(
                        buf,
                        "        pub fn {}(&self) -> ::core::result::Result<{rt}::{calls}::BidiStreaming<{input}, {output}>, {status}> {{",
                        m.name
                    );
                    emit!(
                        buf,
                        "            {call}bidi_streaming(&self.channel, {id}, {path}self.timeout, \"{out_name}\")"
                    );
                }
            }
            emit!(buf, "        }}");
        }
        emit!(buf, "    }}");
        emit!(buf, "}}");
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
            emit!(
                buf,
                "        fn {}(&self, {params}) -> impl ::core::future::Future<Output = ::core::result::Result<{ret}, {status}>> + ::core::marker::Send;",
                m.name
            );
        }
        emit!(buf, "    }}");
        emit!(
            buf,
            "    /// Serves a [`{trait_name}`] implementation over shmesh."
        );
        arc_wrapper(buf, &ty);
        emit!(buf, "    impl<T: {trait_name}> {ty}<T> {{");
        emit!(buf, "        /// Serves `inner`.");
        emit!(buf, "        pub fn new(inner: T) -> Self {{");
        emit!(
            buf,
            "            Self::from_arc(::std::sync::Arc::new(inner))"
        );
        emit!(buf, "        }}");
        emit!(buf, "        /// Serves a shared `inner`.");
        emit!(
            buf,
            "        pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{"
        );
        emit!(buf, "            Self {{ inner }}");
        emit!(buf, "        }}");
        emit!(
            buf,
            "        /// A router serving each method on its id (see [`super::{module}_schema`]);"
        );
        emit!(
            buf,
            "        /// the handlers run on the server's tokio runtime."
        );
        emit!(
            buf,
            "        pub fn into_router(self) -> {rt}::shmesh::server::Router {{"
        );
        if service.methods.is_empty() {
            emit!(buf, "            {rt}::shmesh::server::Router::new()");
        } else {
            emit!(
                buf,
                "            let mut router = {rt}::shmesh::server::Router::new();"
            );
        }
        for m in &service.methods {
            let kind = Kind::of(m);
            let id = format!("super::{module}_schema::{}", m.name.to_shouty_snake_case());
            let in_name = proto_name(&m.input_proto_type);
            let method = &m.name;
            let (helper, params, args) = match kind {
                Kind::Unary => ("unary", "request", "request"),
                Kind::ServerStreaming => (
                    "server_streaming",
                    "request, responses",
                    "request, responses",
                ),
                Kind::ClientStreaming => ("client_streaming", "requests", "requests"),
                Kind::Bidi => ("bidi_streaming", "call", "call"),
            };
            emit!(
                buf,
                "            router = {rt}::server::{helper}(router, {id}, self.inner.clone(), \"{in_name}\", |service: ::std::sync::Arc<T>, {params}| async move {{ service.{method}({args}).await }});"
            );
        }
        if !service.methods.is_empty() {
            emit!(buf, "            router");
        }
        emit!(buf, "        }}");
        emit!(
            buf,
            "        /// A server for this service bound at `address` (`shm:///path` or"
        );
        emit!(
            buf,
            "        /// `shm://@name`): run it with `serve`, or on a thread of its own with"
        );
        emit!(buf, "        /// `BackgroundServer::spawn`.");
        emit!(
            buf,
            "        pub fn bind(self, address: &str) -> ::core::result::Result<{rt}::shmesh::server::Server, {rt}::shmesh::server::ServerError> {{"
        );
        emit!(
            buf,
            "            {rt}::shmesh::server::Server::bind(address, super::{module}_schema::SERVICE_NAME, super::{module}_schema::SCHEMA_HASH, self.into_router())"
        );
        emit!(buf, "        }}");
        emit!(buf, "    }}");
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
        emit!(buf, "    impl<T: {trait_name}> {server}<T> {{");
        emit!(
            buf,
            "        /// The same service over gRPC: a tonic service to add to a"
        );
        emit!(buf, "        /// `tonic::transport::Server`.");
        emit!(buf, "        pub fn into_grpc(self) -> {ty}<T> {{");
        emit!(buf, "            {ty} {{ inner: self.inner }}");
        emit!(buf, "        }}");
        emit!(buf, "    }}");
        emit!(
            buf,
            "    /// A [`{trait_name}`] implementation served over gRPC by tonic (from"
        );
        emit!(buf, "    /// [`{server}::into_grpc`]).");
        arc_wrapper(buf, &ty);
        emit!(
            buf,
            "    impl<T> {rt}::grpc::tonic::server::NamedService for {ty}<T> {{"
        );
        emit!(buf, "        const NAME: &'static str = \"{name}\";");
        emit!(buf, "    }}");
        emit!(
            buf,
            "    impl<T: {trait_name}, B> {codegen}::Service<{codegen}::http::Request<B>> for {ty}<T>"
        );
        emit!(buf, "    where");
        emit!(
            buf,
            "        B: {codegen}::Body + ::core::marker::Send + 'static,"
        );
        emit!(
            buf,
            "        B::Error: ::core::convert::Into<{codegen}::StdError> + ::core::marker::Send + 'static,"
        );
        emit!(buf, "    {{");
        emit!(
            buf,
            "        type Response = {codegen}::http::Response<{rt}::grpc::tonic::body::Body>;"
        );
        emit!(buf, "        type Error = ::core::convert::Infallible;");
        emit!(buf, "        type Future = {rt}::grpc::GrpcFuture;");
        emit!(
            buf,
            "        fn poll_ready(&mut self, _cx: &mut ::core::task::Context<'_>) -> ::core::task::Poll<::core::result::Result<(), Self::Error>> {{"
        );
        emit!(
            buf,
            "            ::core::task::Poll::Ready(::core::result::Result::Ok(()))"
        );
        emit!(buf, "        }}");
        emit!(
            buf,
            "        fn call(&mut self, request: {codegen}::http::Request<B>) -> Self::Future {{"
        );
        emit!(buf, "            match request.uri().path() {{");
        for m in &service.methods {
            let method = &m.name;
            let (helper, params) = match Kind::of(m) {
                Kind::Unary => ("unary", "request"),
                Kind::ServerStreaming => ("server_streaming", "request, responses"),
                Kind::ClientStreaming => ("client_streaming", "requests"),
                Kind::Bidi => ("bidi_streaming", "call"),
            };
            emit!(
                buf,
                "                \"/{name}/{}\" => {rt}::grpc::{helper}(self.inner.clone(), |service: ::std::sync::Arc<T>, {params}| async move {{ service.{method}({params}).await }}, request),",
                m.proto_name
            );
        }
        emit!(
            buf,
            "                path => {rt}::grpc::unimplemented(path),"
        );
        emit!(buf, "            }}");
        emit!(buf, "        }}");
        emit!(buf, "    }}");
    }
}
