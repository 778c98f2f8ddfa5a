//! Expand validated flow models. Never fails.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use super::parse::{ImplModel, StructModel, strip_impl, strip_struct, with_suffix};
use crate::util::{pascal, type_name};

fn serde_path(krate: &TokenStream) -> String {
    format!("{}::__private::serde", krate.to_string().replace(' ', ""))
}

// Input:
//     #[flow(version = 1)]
//     pub struct OrderCircuit { #[link] state: OrderState, #[link] payment: impl Payment }
//
// Output:
//     pub struct OrderCircuit { state: OrderState, payment: PaymentProxy }
//     pub enum OrderCircuitCall { Payment(PaymentCall) }     // the flow's command enum
//     pub struct OrderCircuitHandle(Handle<OrderCircuit>);   // typed methods come from the impl
//     const _: () = { impl Board for OrderCircuit { .. } impl CallSet for OrderCircuitCall { .. } .. };
pub fn expand_struct(m: &StructModel<'_>) -> TokenStream {
    let krate = crate::options::krate(&m.opts);
    let p = quote!(#krate::__private);
    let item = strip_struct(m.original);
    let vis = &item.vis;
    let name = &item.ident;
    let call = format_ident!("{}Call", name);
    let handle = format_ident!("{}Handle", name);
    let flow_name = m.opts.name.clone().unwrap_or_else(|| name.to_string());
    let version = m.opts.version.unwrap_or(1);
    let state_ty = m.state_ty;
    let state_field = m.state_field;
    let state_name = type_name(state_ty);

    let mut variants = Vec::new();
    let mut froms = Vec::new();
    let mut link_arms = Vec::new();
    let mut method_arms = Vec::new();
    let mut encode_arms = Vec::new();
    let mut link_metas = Vec::new();
    let mut link_types = Vec::new();
    let mut proxies = Vec::new();
    for (i, d) in m.drivers.iter().enumerate() {
        let variant = format_ident!("{}", pascal(&d.field.to_string()));
        let dcall = with_suffix(d.path, "Call");
        let proxy = with_suffix(d.path, "Proxy");
        let idx = i as u16;
        let field = d.field;
        let fname = field.to_string();
        let vdoc = format!("A call of the `{fname}` link.");
        variants.push(quote!(#[doc = #vdoc] #variant(#dcall)));
        froms.push(quote! {
            impl ::core::convert::From<#dcall> for #call {
                #[inline]
                fn from(c: #dcall) -> Self { #call::#variant(c) }
            }
        });
        link_arms.push(quote!(#call::#variant(_) => #idx));
        method_arms.push(quote!(#call::#variant(c) => #p::DriverCall::method(c)));
        encode_arms.push(quote!(#call::#variant(c) => #p::encode_raw(c, out)));
        link_metas
            .push(quote!(#p::LinkMeta { field: #fname, driver: &<#proxy as #p::Driver>::META }));
        link_types.push(quote!(#p::TypeId::of::<#proxy> as fn() -> #p::TypeId));
        proxies.push(quote!(#field: <#proxy as ::core::default::Default>::default()));
    }
    // Every flow can start child flows: a call on the link the engine serves itself.
    variants.push(quote!(#[doc(hidden)] __Child(#p::ChildCall)));
    froms.push(quote! {
        impl ::core::convert::From<#p::ChildCall> for #call {
            #[inline]
            fn from(c: #p::ChildCall) -> Self { #call::__Child(c) }
        }
    });
    link_arms.push(quote!(#call::__Child(_) => #p::CHILD_LINK));
    method_arms.push(quote!(#call::__Child(c) => c.method()));
    encode_arms.push(quote!(#call::__Child(c) => c.encode(out)));
    let match_self = quote!(match self { #(#link_arms,)* });
    let match_method = quote!(match self { #(#method_arms,)* });
    let match_encode = quote!(match self { #(#encode_arms,)* });
    // `migrate = [f1, .., fk]`, oldest first: a state written `d` versions back goes
    // through the last `d` of them, each upgrading it by one version.
    let migrate_fn = if m.opts.migrate.is_empty() {
        quote!()
    } else {
        let steps = &m.opts.migrate;
        let version = m.opts.version.unwrap_or(1);
        let oldest = version.saturating_sub(u32::try_from(steps.len()).unwrap_or(u32::MAX));
        let arms = (1..=steps.len()).map(|d| {
            let first = &steps[steps.len() - d];
            let rest = &steps[steps.len() - d + 1..];
            let d = u32::try_from(d).unwrap_or(u32::MAX);
            quote! {
                ::core::option::Option::Some(#d) => ::core::option::Option::Some(
                    #p::migrate_state(#first, old, limit) #(.map(#rest))*
                ),
            }
        });
        let span = steps[0].span();
        quote_spanned! {span=>
            const MIGRATES_FROM: u32 = #oldest;
            fn migrate(
                old: &[u8],
                from: u32,
                limit: usize,
            ) -> ::core::option::Option<::core::result::Result<#state_ty, #p::CodecError>> {
                match #version.checked_sub(from) {
                    #(#arms)*
                    _ => ::core::option::Option::None,
                }
            }
        }
    };
    let state_assert = quote_spanned! {state_ty.span()=>
        #p::assert_state::<#state_ty>();
    };
    let call_doc =
        format!("Every driver call the `{name}` flow can make (generated by `#[flow]`).");
    let handle_doc = format!(
        "A handle to one `{name}` instance, with a method per impulse and probe (generated by `#[flow]`); it dereferences to `Handle<{name}>`."
    );

    quote! {
        #item

        #[doc = #call_doc]
        #[allow(private_interfaces, clippy::large_enum_variant)]
        #vis enum #call {
            #(#variants),*
        }

        #[doc = #handle_doc]
        #[derive(::core::clone::Clone, ::core::fmt::Debug)]
        #vis struct #handle(#p::Handle<#name>);

        #[automatically_derived]
        #[allow(clippy::all, clippy::pedantic)]
        const _: () = {
            #(#froms)*

            impl #p::CallSet for #call {
                #[inline]
                fn link(&self) -> u16 { #match_self }
                #[inline]
                fn method(&self) -> u16 { #match_method }
                fn encode(&self, out: &mut #p::Vec<u8>) -> ::core::result::Result<(), #p::CodecError> {
                    #match_encode
                }
            }

            impl #p::Board for #name {
                type State = #state_ty;
                type Call = #call;
                const NAME: &'static str = #flow_name;
                const VERSION: u32 = #version;
                const STATE: &'static str = #state_name;
                const LINKS: &'static [#p::LinkMeta] = &[#(#link_metas),*];
                fn link_types() -> &'static [fn() -> #p::TypeId] {
                    const TYPES: &[fn() -> #p::TypeId] = &[#(#link_types),*];
                    TYPES
                }
                #[inline]
                fn from_state(state: #state_ty) -> Self {
                    Self { #state_field: state, #(#proxies),* }
                }
                #[inline]
                fn state(&self) -> &#state_ty { &self.#state_field }
                #migrate_fn
            }

            impl ::core::convert::From<#p::Handle<#name>> for #handle {
                fn from(h: #p::Handle<#name>) -> Self { Self(h) }
            }

            impl ::core::ops::Deref for #handle {
                type Target = #p::Handle<#name>;
                fn deref(&self) -> &Self::Target { &self.0 }
            }

            fn __flowwire_assert_state() {
                #state_assert
            }
        };
    }
}

// Input:
//     #[flow]
//     impl OrderCircuit { #[impulse] fn cancel(&mut self) {..}  #[probe] fn is_paid(&self) -> bool {..}
//                         #[wire] fn execute(&mut self) -> Command<Self> {..} }
//
// Output:
//     impl OrderCircuit { fn cancel(..) fn is_paid(..) fn execute(..) }   // markers removed
//     pub enum OrderCircuitImpulse { Cancel {} }                           // serde
//     impl OrderCircuitHandle { pub fn cancel(&self) -> ImpulseRequest; pub async fn is_paid(&self) -> Result<bool> }
//     const _: () = { impl ImpulseSet for OrderCircuitImpulse { .. } impl Impulses for OrderCircuit { .. } impl Flow for OrderCircuit { .. } };
pub fn expand_impl(m: &ImplModel<'_>) -> TokenStream {
    let krate = crate::options::krate(&m.opts);
    let p = quote!(#krate::__private);
    let serde = serde_path(&krate);
    let item = strip_impl(m.original);
    let self_path = m.self_path;
    let (impulse, impulse_ident, handle) = impl_names(self_path);
    let wire = &m.wire.sig.ident;
    let wire_name = wire.to_string();

    let mut variants = Vec::new();
    let mut names = Vec::new();
    let mut applies = Vec::new();
    let mut handle_methods = Vec::new();
    let mut impulse_metas = Vec::new();
    for imp in &m.impulses {
        let ident = &imp.original.sig.ident;
        let variant = format_ident!("{}", pascal(&ident.to_string()));
        let args: Vec<_> = imp.args.iter().map(|a| &a.name).collect();
        let tys: Vec<_> = imp.args.iter().map(|a| a.ty).collect();
        let sname = ident.to_string();
        let vdoc = format!("The `{sname}` impulse.");
        let fdocs: Vec<String> = args
            .iter()
            .map(|n| format!("The `{n}` argument."))
            .collect();
        variants.push(quote!(#[doc = #vdoc] #variant { #(#[doc = #fdocs] #args: #tys),* }));
        names.push(quote!(#impulse_ident::#variant { .. } => #sname));
        applies.push(quote!(#impulse_ident::#variant { #(#args),* } => self.#ident(#(#args),*)));
        let doc = format!(
            "Sends the `{ident}` impulse; `.await` it to apply it durably, once. Set `.id(..)` to make retries safe."
        );
        handle_methods.push(quote! {
            #[doc = #doc]
            pub fn #ident(&self #(, #args: #tys)*) -> #p::ImpulseRequest<'_, #self_path> {
                self.0.impulse(#impulse_ident::#variant { #(#args),* })
            }
        });
        let arg_metas = imp.args.iter().map(|a| {
            let n = a.name.to_string();
            let t = type_name(a.ty);
            quote!(#p::ArgMeta { name: #n, ty: #t })
        });
        impulse_metas.push(quote!(#p::ImpulseMeta { name: #sname, args: &[#(#arg_metas),*] }));
    }
    let mut probe_metas = Vec::new();
    let mut probe_asserts = Vec::new();
    for pr in &m.probes {
        let ident = &pr.original.sig.ident;
        let args: Vec<_> = pr.args.iter().map(|a| &a.name).collect();
        let tys: Vec<_> = pr.args.iter().map(|a| a.ty).collect();
        let out = match &pr.original.sig.output {
            syn::ReturnType::Type(_, ty) => quote!(#ty),
            syn::ReturnType::Default => quote!(()),
        };
        let doc = format!("Reads the `{ident}` probe from the last persisted state.");
        handle_methods.push(quote! {
            #[doc = #doc]
            pub async fn #ident(&self #(, #args: #tys)*) -> ::core::result::Result<#out, #p::Error> {
                self.0.probe(move |f: &#self_path| f.#ident(#(#args),*)).await
            }
        });
        let sname = ident.to_string();
        let result = out.to_string().replace(' ', "");
        let arg_metas = pr.args.iter().map(|a| {
            let n = a.name.to_string();
            let t = type_name(a.ty);
            quote!(#p::ArgMeta { name: #n, ty: #t })
        });
        probe_metas.push(
            quote!(#p::ProbeMeta { name: #sname, args: &[#(#arg_metas),*], result: #result }),
        );
        if let syn::ReturnType::Type(_, ty) = &pr.original.sig.output {
            probe_asserts.push(quote_spanned! {ty.span()=> #p::assert_probe::<#ty>(); });
        }
    }
    let name_match = if names.is_empty() {
        quote!(match *self {})
    } else {
        quote!(match *self { #(#names,)* })
    };
    let base = &self_path
        .segments
        .last()
        .expect("a path has a segment")
        .ident;
    let impulse_doc = format!("The impulses of the `{base}` flow (generated by `#[flow]`).");
    let (correlation_meta, correlate_fn) = match &m.correlate {
        None => (quote!(::core::option::Option::None), quote!()),
        Some((f, optional)) => {
            let ident = &f.sig.ident;
            let name = ident.to_string();
            let body = if *optional {
                quote! {
                    match Self::#ident(self) {
                        ::core::option::Option::Some(key) => {
                            let _ = #p::write_key(out, &key);
                            true
                        }
                        ::core::option::Option::None => false,
                    }
                }
            } else {
                quote! {
                    let _ = #p::write_key(out, &Self::#ident(self));
                    true
                }
            };
            (
                quote!(::core::option::Option::Some(#name)),
                quote! {
                    fn correlate(&self, out: &mut ::std::string::String) -> bool { #body }
                },
            )
        }
    };

    quote! {
        #item

        #[doc = #impulse_doc]
        #[derive(::core::fmt::Debug, ::core::clone::Clone, #p::serde::Serialize, #p::serde::Deserialize)]
        #[serde(crate = #serde)]
        #[allow(private_interfaces)]
        pub enum #impulse_ident {
            #(#variants),*
        }

        #[allow(private_interfaces)]
        impl #handle {
            #(#handle_methods)*
        }

        #[automatically_derived]
        #[allow(clippy::all, clippy::pedantic)]
        const _: () = {
            impl #p::ImpulseSet for #impulse {
                fn name(&self) -> &'static str { #name_match }
            }

            impl #p::Impulses for #self_path {
                type Impulse = #impulse;
            }

            impl #p::Flow for #self_path {
                type Handle = #handle;
                const META: &'static #p::FlowMeta = &#p::FlowMeta {
                    name: <Self as #p::Board>::NAME,
                    version: <Self as #p::Board>::VERSION,
                    state: <Self as #p::Board>::STATE,
                    wire: #wire_name,
                    links: <Self as #p::Board>::LINKS,
                    impulses: &[#(#impulse_metas),*],
                    probes: &[#(#probe_metas),*],
                    correlation: #correlation_meta,
                };
                #[inline]
                fn wire(&mut self) -> #p::Command<Self> { Self::#wire(self) }
                fn apply_impulse(&mut self, impulse: #impulse) {
                    match impulse { #(#applies,)* }
                }
                #correlate_fn
            }

            fn __flowwire_assert_probes() {
                #(#probe_asserts)*
            }
        };
    }
}

/// The names the `impl` block's expansion gives: the impulse enum (as a path and as the
/// ident it is declared with) and the board's typed handle.
fn impl_names(self_path: &syn::Path) -> (syn::Path, syn::Ident, syn::Path) {
    let base = &self_path
        .segments
        .last()
        .expect("a path has a segment")
        .ident;
    (
        with_suffix(self_path, "Impulse"),
        format_ident!("{}Impulse", base),
        with_suffix(self_path, "Handle"),
    )
}

/// What a flow's `impl` block expands to when it has errors: the block without its markers,
/// plus a stand-in `Flow` impl and an empty impulse enum, so that the errors reported are
/// the block's own and not a cascade of "`X` is not a flow" from every use of the flow
/// (thiserror's fallback). The stand-in never runs: the program does not compile.
pub fn fallback_impl(item: &syn::ItemImpl, krate: &TokenStream) -> TokenStream {
    let stripped = strip_impl(item);
    let self_path = match &*item.self_ty {
        syn::Type::Path(tp)
            if item.trait_.is_none()
                && item.generics.params.is_empty()
                && tp.qself.is_none()
                && tp.path.segments.iter().all(|s| s.arguments.is_none()) =>
        {
            &tp.path
        }
        _ => return quote!(#stripped),
    };
    let p = quote!(#krate::__private);
    let serde = serde_path(krate);
    let (impulse, impulse_ident, handle) = impl_names(self_path);
    quote! {
        #stripped

        #[doc(hidden)]
        #[derive(::core::fmt::Debug, ::core::clone::Clone, #p::serde::Serialize, #p::serde::Deserialize)]
        #[serde(crate = #serde)]
        pub enum #impulse_ident {}

        #[automatically_derived]
        #[allow(clippy::all, clippy::pedantic, unreachable_code)]
        const _: () = {
            impl #p::ImpulseSet for #impulse {
                fn name(&self) -> &'static str { match *self {} }
            }

            impl #p::Impulses for #self_path {
                type Impulse = #impulse;
            }

            impl #p::Flow for #self_path {
                type Handle = #handle;
                const META: &'static #p::FlowMeta = &#p::FlowMeta {
                    name: <Self as #p::Board>::NAME,
                    version: <Self as #p::Board>::VERSION,
                    state: <Self as #p::Board>::STATE,
                    wire: "",
                    links: <Self as #p::Board>::LINKS,
                    impulses: &[],
                    probes: &[],
                    correlation: ::core::option::Option::None,
                };
                fn wire(&mut self) -> #p::Command<Self> {
                    ::core::unreachable!("a flow that did not compile")
                }
                fn apply_impulse(&mut self, impulse: #impulse) {
                    match impulse {}
                }
            }
        };
    }
}
