"""fedatlas.site_client: what a site runs on its own data (mapping, bundles, its Flower node)."""
