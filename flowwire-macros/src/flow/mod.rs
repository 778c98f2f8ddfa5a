//! `#[flow]`: on the struct (the board and its links) and on its `impl` block (wire,
//! impulses, probes). The two halves meet through the runtime's `Board` and `Flow` traits.

mod expand;
mod parse;

pub use parse::with_suffix;

use proc_macro2::TokenStream;

use crate::ctxt::Ctxt;

pub fn flow(args: TokenStream, input: &TokenStream) -> TokenStream {
    let mut cx = Ctxt::default();
    match syn::parse2::<syn::Item>(input.clone()) {
        Ok(syn::Item::Struct(item)) => {
            let opts = crate::options::parse(
                "flow",
                args,
                &["version", "name", "crate", "migrate"],
                &mut cx,
            );
            // Checked apart: the board is still generated, so that this mistake is the one
            // error the user sees.
            let steps = u32::try_from(opts.migrate.len()).unwrap_or(u32::MAX);
            let version = opts.version.unwrap_or(1);
            let chain = opts.migrate.first().filter(|_| version <= steps).map(|path| {
                syn::Error::new_spanned(
                    path,
                    format!(
                        "`migrate` lists {steps} step(s), each upgrading a state by one version up to this one: set `version = {}` or more (it is {version})",
                        steps + 1
                    ),
                )
                .to_compile_error()
            });
            let model = parse::parse_struct(&item, opts, &mut cx);
            match (cx.check(), model) {
                (Ok(()), Some(model)) => {
                    let board = expand::expand_struct(&model);
                    quote::quote!(#chain #board)
                }
                (Ok(()), None) => unreachable!("parse_struct reports why it returns None"),
                (Err(errors), _) => {
                    let fallback = parse::fallback_struct(&item);
                    quote::quote!(#errors #fallback)
                }
            }
        }
        Ok(syn::Item::Impl(item)) => {
            let opts = crate::options::parse("flow", args, &["crate"], &mut cx);
            let krate = crate::options::krate(&opts);
            let model = parse::parse_impl(&item, opts, &mut cx);
            match (cx.check(), model) {
                (Ok(()), Some(model)) => expand::expand_impl(&model),
                (Ok(()), None) => unreachable!("parse_impl reports why it returns None"),
                (Err(errors), _) => {
                    let fallback = expand::fallback_impl(&item, &krate);
                    quote::quote!(#errors #fallback)
                }
            }
        }
        _ => {
            cx.error(
                input,
                "`#[flow]` goes on a struct (the board) and on its `impl` block (the wire, impulses and probes)",
            );
            let errors = cx.check().err();
            quote::quote!(#errors #input)
        }
    }
}

#[cfg(test)]
mod tests {
    use quote::quote;

    fn out(args: proc_macro2::TokenStream, input: proc_macro2::TokenStream) -> String {
        super::flow(args, &input).to_string()
    }

    #[test]
    fn an_impl_without_a_wire_is_refused() {
        let o = out(
            quote!(),
            quote!(impl Order { #[impulse] fn cancel(&mut self) {} }),
        );
        assert!(o.contains("a flow needs one `#[wire]` method"), "{o}");
    }

    #[test]
    fn an_impl_with_errors_still_makes_the_flow_a_flow() {
        // The fallback: the errors, then a stand-in `Flow` impl, so that the uses of the
        // flow do not each add "`Order` is not a flow".
        let o = out(
            quote!(),
            quote!(impl Order { #[impulse] async fn cancel(&mut self) {} }),
        );
        assert!(o.contains("compile_error"), "{o}");
        assert!(o.contains("Flow for Order"), "{o}");
        assert!(o.contains("pub enum OrderImpulse { }"), "{o}");
    }

    #[test]
    fn a_wire_returning_another_type_is_refused_at_its_return_type() {
        let o = out(
            quote!(),
            quote!(impl Order { #[wire] fn step(&mut self) -> Result<Command<Self>, String> { Ok(Command::finish()) } }),
        );
        assert!(o.contains("the wire returns `Command<Self>`"), "{o}");
        let ok = out(
            quote!(),
            quote!(impl Order { #[wire] fn step(&mut self) -> flowwire::Command<Self> { Command::finish() } }),
        );
        assert!(!ok.contains("compile_error"), "{ok}");
    }

    #[test]
    fn a_bare_driver_trait_as_a_link_is_told_to_write_impl() {
        let o = out(
            quote!(),
            quote!(
                pub struct Order {
                    #[link]
                    state: u32,
                    #[link]
                    pay: Pay,
                }
            ),
        );
        assert!(o.contains("link it as `impl Pay`"), "{o}");
        assert!(o.contains("pay : ()"), "the fallback drops the trait: {o}");
    }

    #[test]
    fn two_wires_are_refused_at_the_second() {
        let o = out(
            quote!(),
            quote!(impl Order {
                #[wire] fn a(&mut self) -> Command<Self> { Command::finish() }
                #[wire] fn b(&mut self) -> Command<Self> { Command::finish() }
            }),
        );
        assert!(
            o.contains("a flow has one `#[wire]`; `a` is already the wire"),
            "{o}"
        );
    }

    #[test]
    fn a_correlation_key_expands_by_its_return_type() {
        let plain = out(
            quote!(),
            quote!(impl Order {
                #[wire] fn a(&mut self) -> Command<Self> { Command::finish() }
                #[correlate] fn key(&self) -> &str { &self.state.id }
            }),
        );
        assert!(plain.contains("fn correlate"), "{plain}");
        assert!(!plain.contains("Option :: Some (key)"), "{plain}");
        assert!(plain.contains("correlation : :: core :: option :: Option :: Some (\"key\")"));
        let optional = out(
            quote!(),
            quote!(impl Order {
                #[wire] fn a(&mut self) -> Command<Self> { Command::finish() }
                #[correlate] fn key(&self) -> Option<u64> { self.state.id }
            }),
        );
        assert!(
            optional.contains("Option :: Some (key)"),
            "an Option key writes only when present: {optional}"
        );
    }

    #[test]
    fn a_correlation_key_without_a_result_is_refused() {
        let o = out(
            quote!(),
            quote!(impl Order {
                #[wire] fn a(&mut self) -> Command<Self> { Command::finish() }
                #[correlate] fn key(&self) {}
            }),
        );
        assert!(o.contains("a correlation key returns the key"), "{o}");
    }

    #[test]
    fn a_migration_needs_a_version_after_the_first() {
        let o = out(
            quote!(migrate = upgrade),
            quote!(
                pub struct Order {
                    #[link]
                    state: S,
                }
            ),
        );
        assert!(o.contains("set `version = 2` or more"), "{o}");
        let o = out(
            quote!(version = 2, migrate = upgrade),
            quote!(
                pub struct Order {
                    #[link]
                    state: S,
                }
            ),
        );
        assert!(o.contains("fn migrate"), "{o}");
        assert!(o.contains("migrate_state (upgrade"), "{o}");
    }

    #[test]
    fn a_struct_expands_to_its_board() {
        let o = out(
            quote!(version = 2),
            quote!(
                pub struct Order {
                    #[link]
                    state: S,
                    #[link]
                    pay: impl Payment,
                }
            ),
        );
        assert!(o.contains("pay : PaymentProxy"), "{o}");
        assert!(o.contains("pub enum OrderCall"), "{o}");
        assert!(o.contains("const VERSION : u32 = 2u32"), "{o}");
        assert!(!o.contains("compile_error"), "{o}");
    }
}
