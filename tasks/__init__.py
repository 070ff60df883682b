"""One module per external system (kube, flux, talos, ceph, proxmox, git): protocol code and tasks."""
