-- wrk script: 16 requests per write, as the TechEmpower plaintext test pipelines them.
-- wrk counts every response, so Requests/sec is responses per second.
init = function(args)
  local depth = tonumber(os.getenv("PIPELINE") or "16")
  local r = {}
  for i = 1, depth do
    r[i] = wrk.format(nil, "/")
  end
  req = table.concat(r)
end

request = function()
  return req
end
