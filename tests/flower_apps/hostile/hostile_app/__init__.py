"""A Flower app for the tests whose ClientApp turns one site hostile in federated builds."""
