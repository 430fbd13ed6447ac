-- wrk script: POST real photos as raw image/jpeg bodies to /predict, rotating through them.
-- Photo paths come from the BENCH_PHOTOS environment variable, separated by ';'.
local bodies = {}
local counter = 0

function init(args)
  for path in string.gmatch(os.getenv("BENCH_PHOTOS") or "", "[^;]+") do
    local f = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = f:read("*all")
    f:close()
  end
end

function request()
  counter = counter + 1
  local body = bodies[(counter % #bodies) + 1]
  return wrk.format("POST", "/predict?top_k=1", {["Content-Type"] = "image/jpeg"}, body)
end
