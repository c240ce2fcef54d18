"""`tenfold serve --replicas N`: N tenfold engines as Ray Serve replicas behind one ingress, adapters routed by
affinity (Ray Serve model multiplexing). Needs the `ray` extra."""
