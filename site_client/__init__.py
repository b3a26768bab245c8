"""fedatlas.site_client: what a site runs on its own data (mapping; submission to come)."""
