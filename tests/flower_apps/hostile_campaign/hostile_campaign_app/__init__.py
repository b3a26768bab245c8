"""A Flower app for the tests whose ClientApp turns two sites hostile in a campaign."""
