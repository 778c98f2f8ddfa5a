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
mod util;

fn debug(name: &str, out: proc_macro2::TokenStream) -> TokenStream {
    if std::env::var_os("FLOWWIRE_MACROS_DEBUG").is_some_and(|v| v == "1") {
        eprintln!("// #[{name}] expansion\n{out}");
    }
    out.into()
}

/// Turns a trait of `async fn` methods into a driver. See the crate docs.
#[proc_macro_attribute]
pub fn driver(args: TokenStream, input: TokenStream) -> TokenStream {
    debug("driver", driver::driver(args.into(), &input.into()))
}

/// Turns a struct into a flow board, or its `impl` block into the flow's behaviour.
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

/// Marks the wire of a `#[flow]` impl: `fn(&mut self) -> Command<Self>`.
#[proc_macro_attribute]
pub fn wire(_args: TokenStream, input: TokenStream) -> TokenStream {
    stray("wire", input)
}

/// Marks an impulse of a `#[flow]` impl: `fn(&mut self, ..)`.
#[proc_macro_attribute]
pub fn impulse(_args: TokenStream, input: TokenStream) -> TokenStream {
    stray("impulse", input)
}

/// Marks a probe of a `#[flow]` impl: `fn(&self, ..) -> T`.
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
