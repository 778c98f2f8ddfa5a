//! The attribute macros of flowwire. Use them through `flowwire::prelude`.
//!
//! * `#[driver]` on a trait of `async fn` methods: a call enum (`PaymentCall`), a zero-sized
//!   proxy (`PaymentProxy`) whose methods build calls, and dispatch glue so any
//!   implementation of the trait serves the calls.
//! * `#[flow]` on a struct whose fields are `#[link]`s (one state, any `impl Driver` links)
//!   and on its `impl` block with one `#[wire]`, any `#[impulse]` and `#[probe]` methods.
//! * `#[wire]`, `#[impulse]`, `#[probe]` mark methods inside a `#[flow]` impl; used
//!   anywhere else they are a compile error. `#[link]` marks fields inside a `#[flow]` struct.
//!
//! Each macro parses the item into a model (`parse`), checks the rules across it (errors
//! accumulate and are all reported, each at its token), then expands (`expand`, which never
//! fails). Set `FLOWWIRE_MACROS_DEBUG=1` to print every expansion.

use proc_macro::TokenStream;

mod ctxt;
mod driver;
mod flow;
mod options;
#[cfg(test)]
mod snapshots;
mod util;

fn debug(name: &str, out: proc_macro2::TokenStream) -> TokenStream {
    if std::env::var_os("FLOWWIRE_MACROS_DEBUG").is_some_and(|v| v == "1") {
        eprintln!("// #[{name}] expansion\n{out}");
    }
    out.into()
}

/// Turns a trait of `async fn` methods into a driver: a service a flow calls, durably.
///
/// On the trait, it generates the call enum (`PaymentCall`), the zero-sized proxy a flow's
/// `#[link] payment: impl Payment` field holds (its methods build calls, allocating
/// nothing) and the dispatch glue. On an `impl Payment for Stripe` block, it lets the
/// engine serve the calls with that type: `Engine::builder().driver(Stripe)`.
///
/// Each method is `async fn name(&self, args..) -> Result<T, E>`. Arguments are owned
/// (`String`, not `&str`): a call is persisted before it runs. `T` and `E` are
/// serializable; `E` is the error the flow's continuation sees.
///
/// # Options
///
/// On the trait they set the policy of every method; on one method (`#[driver(..)]` on the
/// method inside the trait) they override it for that method. Unset, each comes from the
/// engine's default policy (`EngineBuilder::call_policy`), whose built-in values are
/// below.
///
/// | option | what it sets | built-in default |
/// | --- | --- | --- |
/// | `timeout = "30s"` | the time one attempt may take (`ms`, `s`, `m`, `h`) | `"30s"` |
/// | `retries = 3` | attempts after the first, on a timeout or a panic | `3` |
/// | `backoff = "50ms"` | the first wait between attempts; it doubles, with jitter | `"50ms"` |
/// | `max_backoff = "5s"` | the longest wait between attempts | `"5s"` |
/// | `ambiguous = "retry"` | a call in flight when the engine stopped: `"retry"` sends it again (same idempotency key), `"park"` parks the instance for an operator | `"retry"` |
/// | `crate = "::flowwire"` | the path of the `flowwire` crate, when it is renamed | `::flowwire` |
///
/// # Example
///
/// ```
/// use flowwire::prelude::*;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// #[error("card declined: {0}")]
/// pub struct Declined(String);
///
/// #[driver(timeout = "10s", retries = 5, backoff = "100ms", max_backoff = "10s")]
/// pub trait Payment {
///     async fn charge(&self, order: String, cents: u64) -> Result<String, Declined>;
///     /// Never sent twice blindly: after a crash, an operator decides.
///     #[driver(retries = 0, ambiguous = "park")]
///     async fn refund(&self, charge: String) -> Result<(), Declined>;
/// }
///
/// #[derive(Clone)]
/// pub struct Stripe;
///
/// #[driver]
/// impl Payment for Stripe {
///     async fn charge(&self, order: String, cents: u64) -> Result<String, Declined> {
///         Ok(format!("ch_{order}_{cents}"))
///     }
///     async fn refund(&self, _charge: String) -> Result<(), Declined> {
///         Ok(())
///     }
/// }
/// ```
#[proc_macro_attribute]
pub fn driver(args: TokenStream, input: TokenStream) -> TokenStream {
    debug("driver", driver::driver(args.into(), &input.into()))
}

/// Makes a flow: on a struct, its board (its state and the drivers it calls); on the
/// struct's `impl` block, its behaviour (the wire, the impulses, the probes). Both halves
/// carry `#[flow]`.
///
/// The struct's fields are `#[link]`s: exactly one state (a serializable type, persisted
/// at every step) and any number of drivers, each written `impl Driver`. The `impl` block
/// has one `#[wire]` method, `fn(&mut self) -> Command<Self>`, which the runtime runs
/// again after every step and which must be deterministic (it reads only the state); any
/// number of `#[impulse]` methods, `fn(&mut self, args..)`, each applied exactly once per
/// id; any number of `#[probe]` methods, `fn(&self, args..) -> T`, read-only; and at most
/// one `#[correlate]` method giving the instance's correlation key. The `impl` block
/// generates the impulse enum (`OrderImpulse`) and the typed handle (`OrderHandle`), with
/// one method per impulse and per probe.
///
/// # Options (on the struct)
///
/// | option | what it sets | default |
/// | --- | --- | --- |
/// | `name = "Order"` | the name the flow is stored and found under | the struct's name |
/// | `version = 2` | the version of the state's shape, stored with every instance | `1` |
/// | `migrate = upgrade` | `fn(Previous) -> State`: upgrades a state written by version `version - 1` when an instance is loaded; needs `version >= 2` | none: an instance of another version is parked |
/// | `migrate = [v1_to_v2, v2_to_v3]` | a chain, oldest first, each `fn(Vn) -> Vn+1`, the last ending at this version's state: a state written by any version it reaches back to goes through each step from there; each step is declared once, by the version that introduced it | none |
/// | `crate = "::flowwire"` | the path of the `flowwire` crate, when it is renamed (also on the `impl` block) | `::flowwire` |
///
/// # Example
///
/// ```
/// use flowwire::prelude::*;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
/// #[error("out of stock")]
/// pub struct OutOfStock;
///
/// #[driver]
/// pub trait Warehouse {
///     async fn reserve(&self, sku: String) -> Result<u64, OutOfStock>;
/// }
///
/// /// What version 1 stored.
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// pub struct BasketV1 {
///     sku: String,
/// }
///
/// #[derive(Debug, Default, Clone, Serialize, Deserialize)]
/// pub struct Basket {
///     sku: String,
///     quantity: u32,
///     reservation: Option<u64>,
///     paid: bool,
/// }
///
/// fn upgrade(old: BasketV1) -> Basket {
///     Basket { sku: old.sku, quantity: 1, ..Basket::default() }
/// }
///
/// #[flow(name = "Order", version = 2, migrate = upgrade)]
/// pub struct Order {
///     #[link]
///     state: Basket,
///     #[link]
///     warehouse: impl Warehouse,
/// }
///
/// #[flow]
/// impl Order {
///     #[wire]
///     fn run(&mut self) -> Command<Self> {
///         if self.state.reservation.is_none() {
///             return Command::drive(self.warehouse.reserve(self.state.sku.clone()))
///                 .then(|f, r| { f.state.reservation = Some(r?); Ok(()) });
///         }
///         if self.state.paid { Command::finish() } else { Command::wait() }
///     }
///
///     #[impulse]
///     fn pay(&mut self) {
///         self.state.paid = true;
///     }
///
///     #[probe]
///     fn quantity(&self) -> u32 {
///         self.state.quantity
///     }
/// }
/// ```
#[proc_macro_attribute]
pub fn flow(args: TokenStream, input: TokenStream) -> TokenStream {
    debug("flow", flow::flow(args.into(), &input.into()))
}

fn stray(marker: &str, input: TokenStream) -> TokenStream {
    let input = proc_macro2::TokenStream::from(input);
    let msg = format!(
        "`#[{marker}]` is only valid on a method of a `#[flow]` impl block; add `#[flow]` to the impl"
    );
    let e = syn::Error::new(proc_macro2::Span::call_site(), msg).to_compile_error();
    quote::quote!(#e #input).into()
}

/// Marks the wire of a `#[flow]` impl: `fn(&mut self) -> Command<Self>`. It takes no
/// options; see [`macro@flow`] for an example.
#[proc_macro_attribute]
pub fn wire(_args: TokenStream, input: TokenStream) -> TokenStream {
    stray("wire", input)
}

/// Marks an impulse of a `#[flow]` impl: `fn(&mut self, ..)`, applied exactly once per
/// impulse id. It takes no options; see [`macro@flow`] for an example.
#[proc_macro_attribute]
pub fn impulse(_args: TokenStream, input: TokenStream) -> TokenStream {
    stray("impulse", input)
}

/// Marks a probe of a `#[flow]` impl: `fn(&self, ..) -> T`, a read-only query of the
/// committed state. It takes no options; see [`macro@flow`] for an example.
#[proc_macro_attribute]
pub fn probe(_args: TokenStream, input: TokenStream) -> TokenStream {
    stray("probe", input)
}

/// Marks the correlation key of a `#[flow]` impl: `fn(&self) -> impl Display`, or
/// `fn(&self) -> Option<impl Display>` while the state has none. `Engine::impulse_by_key`
/// finds a live instance by it.
#[proc_macro_attribute]
pub fn correlate(_args: TokenStream, input: TokenStream) -> TokenStream {
    stray("correlate", input)
}
