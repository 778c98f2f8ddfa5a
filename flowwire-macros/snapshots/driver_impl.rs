impl Payment for Stripe {
    async fn charge(&self, order: String, cents: u64) -> Result<String, Declined> {
        Ok(order)
    }
    async fn refund(&self, charge: String) -> Result<(), Declined> {
        Ok(())
    }
}
#[automatically_derived]
impl ::flowwire::__private::Implements<PaymentProxy> for Stripe {}
