package stepca

// Retarget is c pointed at another step-ca (URL, password) with the
// provisioner key it has cached, as after that provisioner was re-created.
func Retarget(c *Client, url string, password []byte) *Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := &Client{cfg: c.cfg, http: c.http, key: c.key}
	n.cfg.URL, n.cfg.Password = url, password
	return n
}
